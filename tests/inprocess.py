"""In-process stand-in for Flower's Grid, for tests of the round loop with the real hospital code.

Each message goes to the real ClientApp handler for its message type (``client.app``), with a
``Context`` whose ``state`` persists per node across messages, as Flower keeps it for a run.
``drop`` injects dropouts: a callable (message_type, partition_id, nth message of that type
to that node) → True to lose the message (as if the hospital went offline or timed out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from client import app as client_app
from simulation.partition import split_by_patient, write_site_dicom
from simulation.phantoms import phantom_population
from simulation.runner import make_site_keys

HANDLERS = {
    "train": client_app.train,
    "train.secagg_keys": client_app.secagg_keys,
    "train.secagg_share": client_app.secagg_share,
    "train.secagg_mask": client_app.secagg_mask,
    "train.secagg_consistency": client_app.secagg_consistency,
    "train.secagg_unmask": client_app.secagg_unmask,
    "query.final_model": client_app.final_model,
}

DropRule = Callable[[str, int, int], bool]


class InProcessGrid:
    """The Grid calls the round loop uses, delivering to ``client.app`` directly."""

    def __init__(self, num_sites: int, run_config: dict[str, object], run_id: int, drop: DropRule | None = None):
        self.nodes = {101 + i: i for i in range(num_sites)}
        self.run_config = run_config
        self.run_id = run_id
        self.drop = drop
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in self.nodes}
        self.sent: Counter[tuple[str, int]] = Counter()
        self.replies: list[Message] = []  # everything the "server" received, for inspection
        self.pushed = 0
        self.pending: dict[str, Message] = {}  # pushed messages' replies not pulled yet, by message id

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for :meth:`pull_messages` under the message's id."""
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"inprocess-{self.pushed}"  # as Flower's grids set it
            ids.append(msg.metadata.message_id)
            for reply in self.send_and_receive([msg]):
                self.pending[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            pid = self.nodes[node]
            kind = msg.metadata.message_type
            nth = self.sent[(kind, pid)]
            self.sent[(kind, pid)] += 1
            if self.drop is not None and self.drop(kind, pid, nth):
                continue
            ctx = Context(
                run_id=self.run_id,
                node_id=node,
                node_config={"partition-id": pid, "num-partitions": len(self.nodes)},
                state=self.states[node],
                run_config=self.run_config,  # type: ignore[arg-type]
            )
            replies.append(HANDLERS[kind](msg, ctx))
        self.replies += replies
        return replies


def write_phantom_sites(root: Path, num_sites: int, patients_per_site: int = 16, seed: int = 5) -> Path:
    """Phantom hospitals as DICOM (2 images per patient) plus their signing keys and roster."""
    source = phantom_population(num_sites * patients_per_site, 2, image_size=32, seed=seed)
    sites = split_by_patient(source, num_sites, "iid", seed=seed)
    for i, idx in enumerate(sites):
        write_site_dicom(source, idx, root / f"site-{i}" / "dicom", site_name=f"site-{i}", seed=seed)
    make_site_keys(root, [f"site-{i}" for i in range(num_sites)])
    return root


def fresh_state(sites_dir: Path) -> None:
    """Forget every site's ledger, audit log and release record (a new consortium); keep data,
    caches and keys.

    The audit log goes too: it records the ledger's states, and a ledger deleted while its audit
    log remains is refused (``LedgerMissing``), as it must be at a real hospital.
    """
    for pattern in ("ledger.json*", "audit.jsonl", "released.json*"):
        for p in sites_dir.glob(f"site-*/{pattern}"):
            p.unlink()
