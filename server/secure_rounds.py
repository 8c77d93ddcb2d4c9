"""Secure rounds over Flower's Grid: the server learns only the sum of the hospitals' vectors.

Session setup (two messages per site: key adverts, then encrypted s-key shares) runs once per
run, and again only after a round in which a participant dropped (its s-key was reconstructed,
so its session is spent). A round is then two messages per site: ``train`` (masked vector and
encrypted b-seed shares) and ``train.secagg-unmask``. Dropouts:

* after the masked vectors are in, up to n − t sites may fail to answer the unmask request;
* a site that never sends its masked vector is "dead": survivors reveal its s-key shares;
* fewer than t survivors at either step → the round restarts with a fresh session among the
  sites that answered (bounded by ``secagg.max-retries``); sites re-mask their cached update.

Every wait is ``grid.send_and_receive(..., timeout=round-timeout)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.protocol import (
    ProtocolError,
    SiteReply,
    content_bytes,
    decode_reply,
    encode_train_request,
    flower_error_line,
    payload_digest,
)
from common.secagg import (
    KeyAdvert,
    MaskedInput,
    SecAggAbort,
    SecAggServer,
    Session,
    Share,
    UnmaskReply,
    default_threshold,
)
from common.secure_protocol import (
    KEYS,
    SHARE,
    UNMASK,
    SessionRef,
    field,
    pairs,
    quantizer_for,
    secagg_record,
    split_pairs,
    str_list,
)
from common.weights import UpdateLayout, fedavg

log = logging.getLogger("medsynth.server")


class SecureRoundFailed(RuntimeError):
    """A secure round could not complete (too few hospitals answered); it may be retried."""


def _send(grid: Grid, requests: Mapping[int, RecordDict], kind: str, group: str, timeout: float) -> list[Message]:
    messages = [
        Message(content, dst_node_id=node, message_type=kind, group_id=group) for node, content in requests.items()
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _ok(replies: list[Message], failures: list[str], step: str) -> list[Message]:
    """Replies without Flower errors or hospital error records; the rest become failure lines."""
    good = []
    for msg in replies:
        if msg.has_error():
            failures.append(f"{step}: {flower_error_line(msg)}")
        elif "privacy" in msg.content.config_records and msg.content.config_records["privacy"]["status"] == "error":
            privacy = msg.content.config_records["privacy"]
            failures.append(f"{step}: {privacy['site']!s}: {privacy['reason']!s}")
        else:
            good.append(msg)
    return good


class SecureRounds:
    """Drives sessions and rounds; holds only public keys, ciphertexts and masked vectors."""

    def __init__(self, grid: Grid, run: RunConfig, run_id: int, layout: UpdateLayout) -> None:
        self.grid, self.run, self.run_id, self.layout = grid, run, run_id, layout
        self.quantizer = quantizer_for(run, layout)
        self.timeout = run.federation.round_timeout_s
        self.setup_id = 0
        self.server: SecAggServer | None = None
        self.nodes_of: dict[str, int] = {}  # site id → Flower node id
        self.costs: dict[str, dict[str, Any]] = {}  # per site this round: bytes up, protocol CPU s, digests

    def _account(self, replies: list[Message]) -> list[Message]:
        """Add each reply's payload bytes and reported protocol CPU seconds to its site's costs."""
        for msg in replies:
            recs = msg.content.config_records
            site = str(recs["privacy"]["site"]) if "privacy" in recs else str(recs["secagg"]["site"])
            cost = self.costs.setdefault(site, {"bytes_up": 0.0, "protocol_cpu_s": 0.0, "received": []})
            cost["bytes_up"] += content_bytes(msg.content)
            cost["protocol_cpu_s"] += float(cast(float, recs["secagg"].get("cpu-s", 0.0)))
            cost["received"].append(received_entry(msg))
        return replies

    @property
    def ref(self) -> SessionRef:
        return SessionRef(self.run_id, self.setup_id)

    def threshold(self, n: int) -> int:
        """max(configured, strict majority): configurable upward only, never below 3.

        A strict majority (2t > n) means two groups of t sites always overlap, so even a server
        that lies about who dropped cannot gather t shares of both kinds for one site.
        """
        t = max(self.run.federation.secagg_threshold, default_threshold(n))
        if n < max(t, 3):
            raise SecureRoundFailed(f"only {n} hospitals available; secure aggregation needs at least {max(t, 3)}")
        return t

    # ---- session setup ---------------------------------------------------------------------
    def setup(self, nodes: list[int], failures: list[str]) -> None:
        """Key adverts from every node, then their encrypted s-key shares; fresh session id."""
        self.setup_id += 1
        self.server = None
        group = f"setup-{self.setup_id}"
        replies = self._account(_ok(
            _send(self.grid, {n: secagg_record(self.ref) for n in nodes}, KEYS, group, self.timeout), failures, "keys"
        ))
        adverts: dict[str, KeyAdvert] = {}
        self.nodes_of = {}
        for msg in replies:
            advert = KeyAdvert.from_bytes(cast(bytes, field(msg.content, "advert")))
            adverts[advert.site_id] = advert
            self.nodes_of[advert.site_id] = msg.metadata.src_node_id
        t = self.threshold(len(adverts))
        request = secagg_record(self.ref, threshold=t, adverts=[adverts[s].to_bytes() for s in sorted(adverts)])
        sent = _send(self.grid, dict.fromkeys(self.nodes_of.values(), request), SHARE, group, self.timeout)
        replies = self._account(_ok(sent, failures, "share"))
        cts = {str(field(m.content, "site")): pairs(m.content, "receivers", "cts") for m in replies}
        if set(cts) != set(adverts):
            missing = sorted(set(adverts) - set(cts))
            raise SecureRoundFailed(f"key setup incomplete: no shares from {missing}")
        server = SecAggServer(Session(self.run_id, self.setup_id), adverts, t, self.layout.size)
        server.route_s_shares(cts)
        self.server = server
        log.info("secure aggregation session %d: %d hospitals, threshold %d", self.setup_id, len(adverts), t)

    # ---- one round -------------------------------------------------------------------------
    def _masked_round(
        self, server: SecAggServer, global_arrays: dict[str, np.ndarray], server_round: int, failures: list[str]
    ) -> tuple[np.ndarray, list[str], dict[str, SiteReply]]:
        server.begin_round(server_round)
        content = encode_train_request(global_arrays, server_round)
        content["secagg"] = ConfigRecord(self.ref.fields())  # type: ignore[arg-type]
        replies = self._account(_ok(_send(self.grid, dict.fromkeys(self.nodes_of.values(), content), MessageType.TRAIN,
                                          str(server_round), self.timeout), failures, "train"))
        privacy: dict[str, SiteReply] = {}
        for msg in replies:
            reply = decode_reply(msg.content)
            if "masked" not in msg.content.array_records:
                raise ProtocolError(f"{reply.site_id} sent no masked vector")
            y = msg.content.array_records["masked"]["y"].numpy()
            server.receive_masked(reply.site_id, MaskedInput(y, pairs(msg.content, "receivers", "cts")))
            privacy[reply.site_id] = reply
        requests = server.unmask_requests()
        unmask_content: dict[int, RecordDict] = {}
        for site, (alive, dead, s_cts, b_cts) in requests.items():
            s_senders, s_blobs = split_pairs(s_cts)
            b_senders, b_blobs = split_pairs(b_cts)
            unmask_content[self.nodes_of[site]] = secagg_record(
                self.ref, round=server_round, alive=sorted(alive), dead=sorted(dead),
                s_senders=s_senders, s_cts=s_blobs, b_senders=b_senders, b_cts=b_blobs,
            )
        unmasked = _ok(_send(self.grid, unmask_content, UNMASK, str(server_round), self.timeout), failures, "unmask")
        for msg in self._account(unmasked):
            site = str(field(msg.content, "site"))
            b = dict(zip(str_list(msg.content, "b_sites"), field(msg.content, "b_shares"), strict=True))  # type: ignore[call-overload]
            s = dict(zip(str_list(msg.content, "s_sites"), field(msg.content, "s_shares"), strict=True))  # type: ignore[call-overload]
            server.receive_unmask(site, UnmaskReply(
                b_shares={k: Share.from_bytes(v) for k, v in b.items()},
                s_shares={k: Share.from_bytes(v) for k, v in s.items()},
            ))
        total, alive = server.aggregate()
        return total, alive, privacy

    def run_round(
        self, nodes: list[int], global_arrays: dict[str, np.ndarray], server_round: int
    ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        """One secure round with bounded restarts; returns (new arrays or None, round record)."""
        t0 = time.monotonic()
        failures: list[str] = []
        self.costs = {}
        record: dict[str, Any] = {"round": server_round, "failures": failures, "costs": self.costs}
        for attempt in range(self.run.federation.secagg_max_retries + 1):
            try:
                if self.server is None:
                    self.setup(nodes, failures)
                if self.server is None:
                    raise SecureRoundFailed("no session")
                total, alive, privacy = self._masked_round(self.server, global_arrays, server_round, failures)
            except (SecureRoundFailed, SecAggAbort, ProtocolError) as exc:
                failures.append(f"attempt {attempt + 1}: {type(exc).__name__}: {exc}")
                log.warning("round %d attempt %d failed: %s", server_round, attempt + 1, exc)
                self.server = None  # a fresh session among whoever is still there
                nodes = sorted(self.grid.get_node_ids())
                continue
            dead = sorted(set(self.nodes_of) - set(alive))
            if dead:
                self.server = None  # the dead sites' s-keys were revealed: new session next round
            vector = self.quantizer.decode_sum(total, len(alive))
            record.update(
                sites_trained=sorted(s for s in alive if privacy.get(s) and privacy[s].status == "ok"),
                sites_budget_exhausted=sorted(s for s, r in privacy.items() if r.status == "budget-exhausted"),
                privacy={s: privacy_entry(r) for s, r in privacy.items()},
                secure={"session": self.setup_id, "alive": alive, "dead": dead, "attempts": attempt + 1},
            )
            new_arrays = None
            if record["sites_trained"]:
                new_arrays, metrics = fedavg(global_arrays, self.layout, vector)
                record.update(metrics)
            record["seconds"] = round(time.monotonic() - t0, 2)
            return new_arrays, record
        record.update(sites_trained=[], sites_budget_exhausted=[], privacy={},
                      seconds=round(time.monotonic() - t0, 2))
        return None, record


def received_entry(msg: Message) -> dict[str, Any]:
    """What the server records of one reply: its type, size and payload digest (matches the
    hospital's audit log line for the same message)."""
    return {"type": msg.metadata.message_type, "group": msg.metadata.group_id,
            "bytes": content_bytes(msg.content), "sha256": payload_digest(msg.content)}


def privacy_entry(r: SiteReply) -> dict[str, Any]:
    return {
        "status": r.status,
        "epsilon": r.epsilon,
        "epsilon_budget": r.epsilon_budget,
        "delta": r.delta,
        "steps": r.total_steps,
    }
