"""The server's round loop over Flower's Grid: send the global model, sum the replies, FedAvg.

Per round: wait for hospitals, send each the global model, collect replies within a timeout,
sum the update vectors of those that trained, apply FedAvg, checkpoint atomically, save a
sample grid, write the server state. Hospitals that hit their budget, failed, or did not
answer in time are recorded and the round goes on with the others. The run ends early, and
cleanly, when no hospital can train any more. After the last round every connected hospital is
sent the final global model (``query.final_model``), which it keeps and does not train on.

While it waits for hospitals the loop says who has joined and who is missing (by site id, from
``STATE/results/hospitals.json`` that ``server start`` writes), on every change and every
:data:`WAIT_REPORT_S` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from common.atomic import read_json_object, write_json_atomic
from common.checkpoint import Checkpoint, content_hash, latest_valid_checkpoint, save_checkpoint
from common.checkpoint_model import InitialModel, load_initial_model
from common.config import ConfigError, RunConfig
from common.dp.embedding import warm_start_generator
from common.dp.warm_start import WARM_START_ROUND, EmbeddingSpec
from common.errors import EXIT_RESTARTABLE, UserError
from common.models import Discriminator, Generator, build_models
from common.protocol.messages import (
    FINAL_MODEL,
    ProtocolError,
    SiteReply,
    decode_final_ack,
    decode_reply,
    encode_final_model,
    encode_train_request,
    flower_error_line,
)
from common.report.html import write_report
from common.report.samples import sample_grid, save_png
from common.round_record import (
    RECORDS_FILE,
    FinalModel,
    Initialisation,
    ReceivedMessage,
    RecordError,
    RoundMetrics,
    RoundRecord,
    ServerState,
    SiteCost,
    StoppedEarly,
    latest_privacy,
    write_server_state,
)
from common.weights import UpdateLayout, load_model_arrays, model_arrays, sum_vectors
from server.exchange import send_and_receive
from server.outcome import LAST_ERROR_FILE
from server.registry import HOSPITALS_FILE, NodeRegistry
from server.secagg import Aggregate, SecureRounds, fedavg_of, privacy_fields, received_entry

log = logging.getLogger("medsynth.server")

#: seconds between two "waiting for hospitals" lines when nobody joins or leaves
WAIT_REPORT_S = 30.0


class NoHospitals(UserError, RuntimeError):
    """Not enough hospitals connected within the wait timeout: a late hospital is transient, so
    the server exits 1 and its service manager starts it again (the next start waits again)."""

    exit_code = EXIT_RESTARTABLE


@dataclass(frozen=True)
class ServerPaths:
    """Where the server writes: checkpoints/, samples/ and server_state.json under ``root``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def state(self) -> Path:
        return self.root / RECORDS_FILE

    @property
    def warm_start(self) -> Path:
        return self.root / "warm_start.json"

    @property
    def hospitals(self) -> Path:
        """Site id → node id, written by ``server start`` (absent in a simulation)."""
        return self.root / HOSPITALS_FILE

    @property
    def last_error(self) -> Path:
        """Why the ServerApp stopped, for ``server start`` (``server.outcome``)."""
        return self.root / LAST_ERROR_FILE


def waiting_line(connected: Sequence[int], minimum: int, registry: NodeRegistry) -> str:
    """One line: how many of the hospitals needed have joined, which, and which registered ones are missing."""
    joined = registry.names(connected)
    line = f"waiting for hospitals: {len(connected)} of the {minimum} needed joined"
    if joined:
        line += f" ({', '.join(joined)})"
    missing = registry.missing(connected)
    if missing:
        line += f"; missing: {', '.join(missing)}"
    return line


def wait_for_nodes(
    grid: Grid,
    minimum: int,
    timeout_s: float,
    registry: NodeRegistry | None = None,
    *,
    say: Callable[[str], None] = log.info,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report_every_s: float = WAIT_REPORT_S,
) -> list[int]:
    """Node ids once at least ``minimum`` are connected; raises ``NoHospitals`` on timeout.

    Silent when enough are there at once; otherwise says :func:`waiting_line` at the start, on
    every change of who is connected and every ``report_every_s``, and who is there once enough are.
    """
    registry = registry or NodeRegistry()
    start = clock()
    last_seen: list[int] | None = None
    last_said = start
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            if last_seen is not None:
                say(f"hospitals joined: {len(nodes)} of the {minimum} needed ({', '.join(registry.names(nodes))})")
            return nodes
        now = clock()
        if nodes != last_seen or now - last_said >= report_every_s:
            say(waiting_line(nodes, minimum, registry))
            last_seen, last_said = nodes, now
        if now - start > timeout_s:
            missing = registry.missing(nodes)
            raise NoHospitals(
                f"only {len(nodes)} of the {minimum} hospitals needed joined within {timeout_s:.0f} s"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + "; check that their nodes run and reach the SuperLink; the next start waits again"
            )
        sleep(1.0)


def collect_replies(replies: list[Message]) -> tuple[list[SiteReply], list[str]]:
    """Decode replies; Flower-level errors and malformed replies become readable failure lines."""
    decoded: list[SiteReply] = []
    failures: list[str] = []
    for msg in replies:
        if msg.has_error():
            failures.append(flower_error_line(msg))
            continue
        try:
            decoded.append(decode_reply(msg.content))
        except ProtocolError as exc:
            failures.append(f"node {msg.metadata.src_node_id}: malformed reply ({exc})")
    return decoded, failures


def run_round(
    grid: Grid,
    nodes: list[int],
    global_arrays: dict[str, np.ndarray],
    layout: UpdateLayout,
    server_round: int,
    timeout_s: float,
    aggregate: Aggregate | None = None,
    warm_start: np.ndarray | None = None,
    in_flight: int = 0,
) -> tuple[dict[str, np.ndarray] | None, RoundRecord]:
    """One round; returns (new global arrays or None if nobody trained, the round record)."""
    t0 = time.monotonic()
    content = encode_train_request(global_arrays, server_round, warm_start)
    messages = [
        Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(server_round))
        for n in nodes
    ]
    replies = send_and_receive(grid, messages, timeout_s, in_flight)
    decoded, failures = collect_replies(replies)
    costs = {
        str(m.content.config_records["privacy"]["site"]): SiteCost.of([received_entry(m)])
        for m in replies
        if not m.has_error() and "privacy" in m.content.config_records
    }
    missing = len(nodes) - len(replies)
    if missing:
        failures.append(f"{missing} hospital(s) did not answer within {timeout_s:.0f} s")
    failures += [f"{r.site_id}: {r.reason}" for r in decoded if r.status == "error"]
    trained = [r for r in decoded if r.status == "ok" and r.update is not None]
    new_arrays, metrics = None, None
    if trained:
        total = sum_vectors([r.update for r in trained if r.update is not None])  # plain sum
        new_arrays, metrics = (aggregate or fedavg_of(global_arrays, layout))(total)
    record = RoundRecord(
        round=server_round,
        sites_trained=tuple(sorted(r.site_id for r in trained)),
        failures=tuple(failures),
        costs=costs,
        metrics=metrics,
        seconds=round(time.monotonic() - t0, 2),
        **privacy_fields({r.site_id: r for r in decoded if r.status != "error"}),
    )
    return new_arrays, record


def deliver_final_model(grid: Grid, arrays: dict[str, np.ndarray], history: Sequence[RoundRecord],
                        timeout_s: float, in_flight: int = 0) -> FinalModel:
    """Send every connected hospital the final global model, the last round of ``history``'s, with each
    hospital's newest privacy report (it keeps both, trains nothing); who kept it."""
    nodes = sorted(grid.get_node_ids())
    model_round = history[-1].round
    content = encode_final_model(arrays, model_round, latest_privacy(history))
    messages = [Message(content, dst_node_id=n, message_type=FINAL_MODEL, group_id=f"final-{model_round}")
                for n in nodes]
    replies = send_and_receive(grid, messages, timeout_s, in_flight)
    failures: list[str] = []
    received: dict[str, ReceivedMessage] = {}
    for msg in replies:
        if msg.has_error():
            failures.append(flower_error_line(msg))
            continue
        privacy = msg.content.config_records.get("privacy")
        if privacy is not None:  # the hospital refused (a fixed error text, as for a round)
            failures.append(f"{privacy.get('site')!s}: {privacy.get('reason')!s}")
            continue
        try:
            site, _ = decode_final_ack(msg.content)
        except ProtocolError as exc:
            failures.append(f"node {msg.metadata.src_node_id}: malformed answer ({exc})")
            continue
        received[site] = received_entry(msg)
    if len(replies) < len(nodes):
        failures.append(f"{len(nodes) - len(replies)} hospital(s) did not answer within {timeout_s:.0f} s")
    return FinalModel(model_round, content_hash(arrays), tuple(sorted(received)), tuple(failures), received)


def describe_final(final: FinalModel) -> str:
    """One log line: who received the final model."""
    line = f"final model (round {final.round}) sent: kept by {', '.join(final.kept) or 'nobody'}"
    return line + ("; failures: " + "; ".join(final.failures) if final.failures else "")


def describe_round(record: RoundRecord, num_rounds: int) -> str:
    """One readable log line per round."""
    eps = ", ".join(
        f"{site} ε={p.epsilon:.2f}/{p.epsilon_budget:g}"
        + ("" if p.noise_multiplier is None else f" σ={p.noise_multiplier:.3g}")
        + ("" if p.status == "ok" else " (budget spent)")
        for site, p in sorted(record.privacy.items())
    )
    m = record.metrics
    losses = "no update" if m is None else f"loss_d_fake={m.loss_d_fake:.3f} loss_g={m.loss_g:.3f}"
    trained = len(record.sites_trained)
    if record.round == WARM_START_ROUND:
        line = f"round 0 (warm start): {trained} released their class means; {eps}; {record.seconds:.1f} s"
    else:
        line = f"round {record.round}/{num_rounds}: {trained} trained; {losses}; {eps}; {record.seconds:.1f} s"
    if record.failures:
        line += "; failures: " + "; ".join(record.failures)
    return line


@dataclass(frozen=True)
class WarmStartRelease:
    """The summed warm-start release of a run (DP output), kept so a resumed run anchors G to it."""

    run_id: int
    total: np.ndarray  # (EmbeddingSpec.size,) float64

    def write(self, path: Path) -> None:
        write_json_atomic(path, {"format": 1, "run_id": self.run_id, "sum": [float(v) for v in self.total]})

    @staticmethod
    def read(path: Path, size: int) -> WarmStartRelease | None:
        """The stored release, or None when there is none; ``RecordError`` when it is not one."""
        if not path.is_file():
            return None
        raw = read_json_object(path)
        total = np.asarray(raw.get("sum"), dtype=np.float64)
        if raw.get("format") != 1 or total.shape != (size,) or not isinstance(raw.get("run_id"), int):
            raise RecordError(f"{path} is not a warm-start release of {size} values; move it away to start over")
        return WarmStartRelease(int(raw["run_id"]), total)


def warm_start_aggregate(run: RunConfig, netG: Generator, netD: Discriminator, kept: list[np.ndarray]) -> Aggregate:
    """Round 0's :data:`Aggregate`: pre-train G on the summed release (post-processing), keep the sum."""
    spec = EmbeddingSpec.of(run)

    def aggregate(total: np.ndarray) -> tuple[dict[str, np.ndarray], RoundMetrics | None]:
        release = np.asarray(total[: spec.size], dtype=np.float64)
        _, loss = warm_start_generator(netG, spec, release, warm_start=run.warm_start, model=run.model,
                                       train=run.train, seed=run.federation.seed, device=torch.device("cpu"))
        log.info("warm start: G pre-trained for %d steps on the summed class means (embedding loss %.4f)",
                 run.warm_start.pretrain_steps, loss)
        kept.append(release)
        return model_arrays(netG, netD), None

    return aggregate


def initial_model(run: RunConfig) -> InitialModel | None:
    """The public checkpoint of ``init-from``, verified and of the run's shapes; None without one.

    The file was checked before the run was submitted (``simulate``, ``server start``); checked
    again here, so a file changed since is refused (exit 2) before any round.
    """
    fed = run.federation
    if not fed.init_from:
        return None
    initial = load_initial_model(Path(fed.init_from), run.model, what="init-from")
    if initial.class_names is not None and initial.class_names != run.class_names:
        log.warning("init-from %s was trained on classes %s, this run's are %s: class k must mean the same on "
                    "both sides", fed.init_from, ",".join(initial.class_names), ",".join(run.class_names))
    return initial


def check_resumed_initialisation(ckpt: Checkpoint, run: RunConfig, initial: InitialModel | None) -> None:
    """Refuse to resume a run that started otherwise than ``init-from`` now says (its records would lie)."""
    now = None if initial is None else initial.initialisation.public_sha256
    if ckpt.initialisation.public_sha256 != now:
        said = "no init-from" if now is None else f"init-from = {run.federation.init_from} (sha256 {now[:16]}…)"
        raise ConfigError(f"the run in {ckpt.path.parent} began with '{ckpt.initialisation.describe()}', but the run "
                          f"config now says {said}; restore the setting to resume, or start the run in a new output "
                          "folder")


def run_federation(grid: Grid, run: RunConfig, paths: ServerPaths, run_id: int) -> ServerState:
    """Run (or resume) the rounds of ``run`` and return the final server state.

    Secure aggregation (default) or, only when ``secure-aggregation = false``, plain sums. G and D
    start from the seeded random initialisation, or from a public checkpoint (``init-from``). With a
    warm start, round 0 collects the hospitals' release and pre-trains G (from those weights) before
    round 1.
    """
    fed = run.federation
    ckpt = latest_valid_checkpoint(paths.checkpoints)
    netG, netD = build_models(run.model, seed=fed.seed)
    initial = initial_model(run)
    if ckpt is not None:
        check_resumed_initialisation(ckpt, run, initial)
        load_model_arrays(netG, netD, ckpt.arrays)
        arrays, history, start = ckpt.arrays, ckpt.history, ckpt.round + 1
        initialisation = ckpt.initialisation
        log.info("resuming from %s (round %d)", ckpt.path, ckpt.round)
    else:
        if initial is not None:
            load_model_arrays(netG, netD, initial.arrays)
        initialisation = Initialisation.random(fed.seed) if initial is None else initial.initialisation
        arrays, history, start = model_arrays(netG, netD), (), 1
        log.info("model: %s", initialisation.describe())
    layout = UpdateLayout.of(arrays)
    secure = SecureRounds(grid, run, run_id, layout) if fed.secure_aggregation else None
    if secure is None:
        log.warning("plain aggregation: the server sees every hospital's update (secure-aggregation = false)")
    state = ServerState(rounds=history, finished=False, secure_aggregation=fed.secure_aggregation,
                        run_id=run_id, initialisation=initialisation)
    release: np.ndarray | None = None
    if run.warm_start.enabled:
        stored = WarmStartRelease.read(paths.warm_start, EmbeddingSpec.of(run).size)
        release = None if stored is None else stored.total
        if release is None and ckpt is None:
            start = WARM_START_ROUND
        elif release is None:
            raise RecordError(f"{paths.checkpoints} holds a run with a warm start but {paths.warm_start} is "
                              "missing; restore it, or start the run in a new output folder")
    registry = NodeRegistry.read(paths.hospitals)
    for server_round in range(start, fed.num_rounds + 1):
        nodes = wait_for_nodes(grid, fed.min_nodes, fed.wait_nodes_timeout_s, registry)
        kept: list[np.ndarray] = []
        aggregate = warm_start_aggregate(run, netG, netD, kept) if server_round == WARM_START_ROUND else None
        if secure is not None:
            new_arrays, record = secure.run_round(nodes, arrays, server_round, aggregate, release,
                                                  prepare_next=server_round < fed.num_rounds)
        else:
            new_arrays, record = run_round(grid, nodes, arrays, layout, server_round, fed.round_timeout_s,
                                           aggregate, release, fed.messages_in_flight)
        log.info(describe_round(record, fed.num_rounds))
        if new_arrays is None:
            reason = f"round {server_round}: no hospital could train (budgets spent or failures)"
            state = replace(state, stopped_early=StoppedEarly(reason, record))
            log.info("stopping: %s", reason)
            break
        if kept:  # round 0: stored before its checkpoint, so a checkpoint always has its release
            release = kept[0]
            WarmStartRelease(run_id, release).write(paths.warm_start)
        arrays = new_arrays
        state = replace(state, rounds=(*state.rounds, record))
        save_checkpoint(paths.checkpoints, server_round, arrays, state.rounds, class_names=run.class_names,
                        run_id=run_id, initialisation=initialisation)
        load_model_arrays(netG, netD, arrays)
        save_png(sample_grid(netG, run.model, seed=fed.seed), paths.samples / f"round-{server_round:04d}.png")
        write_server_state(paths.state, state)
        write_report(paths.root)  # readable while the run goes on, and after a crash
    if state.rounds:  # the model of the last completed round: every hospital keeps it
        final = deliver_final_model(grid, arrays, state.rounds, fed.round_timeout_s, fed.messages_in_flight)
        log.info(describe_final(final))
        state = replace(state, final_model=final)
    state = replace(state, finished=True)
    write_server_state(paths.state, state)
    write_report(paths.root)
    return state
