"""Benchmark: secure against plain aggregation on Flower's Deployment Engine, on loopback.

What runs
---------
N phantom hospitals (default 5) are written as DICOM and prepared, each with a signing key, and
one roster is made (``simulation.runner``). One :class:`simulation.deployment.LocalDeployment`
starts a real ``flower-superlink`` and one ``flower-supernode`` per hospital with a deployment
node config (``data-dir``, ``state-dir``, ``site-id``, ``epsilon-budget``, ``signing-key-path``,
``roster-path``, and ``allow-plain-aggregation = true``: a hospital sends an unmasked update only if
its own node config consents). On that same deployment, back to back in this one process, medsynth runs R rounds
with plain aggregation (``secure-aggregation = false``), then R rounds with secure aggregation.
Each run starts from empty ledgers (a fresh consortium, same budget and so the same calibrated
noise) and writes to its own output folder. The model is the default of ``pyproject.toml``;
only the training length (``--local-steps``, ``--batch-size``) can be changed; both default to
the app's (``train.local-steps`` = 50, ``train.batch-size``). At those, 3 hospitals take about
2 minutes on 2 CPUs and 20 about 8 (docs/benchmarks.md).

What is reported (per hospital per round unless noted; medians)
----------------------------------------------------------------
* round wall time: the server's ``seconds`` for the round in ``server_state.json`` (first
  message sent → sum aggregated; the checkpoint and sample grid are not included). The ratio
  secure / plain is the figure to compare with the goal (≤ 1.3×). It is given over all rounds
  and over steady rounds only.
* setup vs steady rounds: a secure round with a key set-up stage of its own (key adverts and
  encrypted key shares: the first round, or one after a change of hospitals) is a *setup*
  round; the others, whose session was set up alongside the round before, are *steady*. For
  plain aggregation round 1 is listed as "first" for comparison (it pays the one-off
  installation of the app on each SuperNode).
* protocol CPU: the CPU seconds each hospital spent in the secure-aggregation steps (key
  agreement, sharing, masking, unmasking), read from its own audit log (``cpu_s``; hospitals
  never send timings); setup steps count in the round they preceded. It does not include
  starting a ClientApp process, which Flower does for every message (see "ClientApp time").
* bytes up: ``costs.bytes_up``, the payload bytes of everything the hospital sent in the round.
* messages: messages each SuperNode received, read from its log (``[RUN r, ROUND g]`` /
  ``Receiving: ...``); session setup messages count in the round they preceded.
* ClientApp time: Flower's own ``compute-time.clientapp-seconds`` for the run (``flwr ls``),
  divided by hospitals × rounds. Per message it is the wall time from the ClientApp process
  pulling the message to pushing its reply: installing the app bundle and importing the app
  (torch, opacus) are included, starting the Python interpreter is not.

* training CPU: the CPU seconds of each hospital's ``train`` message (audit log), and the round's
  wall time divided by it: what the rest of the round (messages, process starts, waiting) costs
  around the training.

``--launch`` says how each message's ClientApp process starts: ``fork-server`` (the default,
as ``medsynth node start`` runs it: forked from a process that has the libraries imported,
``client.forkserver``), ``plain`` (Flower's ``flwr-clientapp``, a fresh interpreter per
message), or ``both``: each on its own deployment, one after the other, with the ratio of their
steady round times.

Nothing is asserted; timings depend on the machine and on anything else running on it (the
load average is printed).

    python -m simulation.bench_secagg [--sites 5] [--rounds 3] [--local-steps 50] [--batch-size 32]
        [--launch fork-server|plain|both] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.audit import read_entries
from common.config import ConfigError
from common.flower import NodeConfig, RunConfigValue, SuperLinkError, flwr_json, run_app
from common.protocol.secagg import KEYS
from common.round_record import RECORDS_FILE, RecordError, RoundRecord, read_server_state
from simulation.deployment import LocalDeployment
from simulation.runner import (
    ROUND_LINE,
    SimulateOptions,
    build_sites,
    check_out_dir,
    deployed_node_config,
    forget_privacy_history,
    load_source,
    project_dir,
)

_NUMERIC_GROUP = re.compile(r"^\d+$")
LAUNCHES = ("fork-server", "plain", "both")


@dataclass(frozen=True)
class ModeResult:
    """Everything measured for one run (one aggregation mode)."""

    secure: bool
    run_id: int
    run_wall_s: float
    rounds: tuple[RoundRecord, ...]  # server_state.json round records
    setup_rounds: frozenset[int]  # rounds that opened a secure session (plain: round 1, "first")
    messages: dict[str, dict[int, int]]  # site → round → messages received
    clientapp_s: float | None  # Flower's compute-time.clientapp-seconds for the run
    protocol_cpu: dict[str, dict[int, float]]  # site → round → secure-aggregation CPU s (audit logs)
    train_cpu: dict[str, dict[int, float]]  # site → round → CPU s of its `train` message (audit logs)

    @property
    def label(self) -> str:
        """``secure`` or ``plain``."""
        return "secure" if self.secure else "plain"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _by_round(items: Iterable[tuple[str, float]]) -> dict[int, float]:
    """(message group, amount) in arrival order → round → total; ``setup-N`` amounts count in the
    round they preceded."""
    per_round: dict[int, float] = defaultdict(float)
    pending = 0.0
    for group, amount in items:
        if _NUMERIC_GROUP.match(group):
            per_round[int(group)] += amount + pending
            pending = 0.0
        else:
            pending += amount
    return dict(per_round)


def messages_per_round(deployment: LocalDeployment, run_id: int) -> dict[str, dict[int, int]]:
    """Site → round → messages its SuperNode received; ``setup-N`` groups count in the next round."""
    counts = {site: _by_round((m.group, 1.0) for m in deployment.received_messages(site, run_id))
              for site in deployment.sites}
    return {site: {r: int(n) for r, n in per_round.items()} for site, per_round in counts.items()}


def cpu_per_round(ledgers: dict[str, Path], run_id: int, training: bool) -> dict[str, dict[int, float]]:
    """Site → round → CPU seconds of its secure-aggregation steps (``training=False``) or of its
    ``train`` message (``True``: local DP training and what the handler does around it), from each
    hospital's audit log (beside its ledger); ``setup-N`` steps count in the next round."""
    def counted(action: str) -> bool:
        return action == "train" if training else action.startswith("train.secagg")

    return {
        site: _by_round(
            (e.group, e.cpu_s) for e in read_entries(ledger.parent / "audit.jsonl")
            if e.run == str(run_id) and counted(e.action) and e.cpu_s is not None
        )
        for site, ledger in ledgers.items()
    }


def setup_rounds_of(rounds: Sequence[RoundRecord], secure: bool) -> frozenset[int]:
    """Rounds that ran a key set-up stage of their own (``train.secagg_keys``: the first round, or
    one after a change of hospitals); plain: just round 1, for comparison. A round whose session
    was set up alongside the round before (``server.secagg``) is steady."""
    if not secure:
        return frozenset(r.round for r in rounds[:1])
    return frozenset(r.round for r in rounds
                     if any(m.type == KEYS for cost in (r.costs or {}).values() for m in cost.received))


def clientapp_seconds(deployment: LocalDeployment, run_id: int) -> float | None:
    """Flower's ``compute-time.clientapp-seconds`` for a run, or None if ``flwr ls`` does not say."""
    try:
        data = flwr_json(["ls", deployment.env.connection, "--run-id", str(run_id)], deployment, 30.0)
    except SuperLinkError:
        return None
    runs = data.get("runs") or [{}]
    value = runs[0].get("compute-time", {}).get("clientapp-seconds")
    return float(value) if isinstance(value, int | float) else None


def run_mode(
    deployment: LocalDeployment,
    *,
    secure: bool,
    out: Path,
    ledgers: dict[str, Path],
    base_config: dict[str, RunConfigValue],
    timeout_s: float,
    say: Callable[[str], None],
) -> ModeResult:
    """One run of R rounds in one aggregation mode, from empty ledgers, into ``out``."""
    for ledger in ledgers.values():
        forget_privacy_history(ledger)
    if out.exists():
        shutil.rmtree(out)
    run_config = {**base_config, "output-dir": str(out), "secure-aggregation": secure}
    label = "secure" if secure else "plain"

    def on_line(line: str) -> None:
        if match := ROUND_LINE.search(line):
            say(f"  [{label}] {match.group(0)}")

    say(f"{label}: {base_config['num-server-rounds']} rounds ...")
    result = run_app(
        project_dir(), deployment, run_config=run_config, log_path=out / "run.log", timeout_s=timeout_s, on_line=on_line
    )
    state_path = out / RECORDS_FILE
    try:
        state = read_server_state(state_path)
    except (OSError, RecordError) as err:
        raise SuperLinkError(f"{label} run {result.run_id} left no readable {state_path}: {err}") from err
    if state is None:
        raise SuperLinkError(f"{label} run {result.run_id} left no {state_path}. Log: {out / 'run.log'}")
    rounds = tuple(r for r in state.rounds if r.round > 0)  # round 0 is the warm start, not a training round
    if not state.finished or len(rounds) != base_config["num-server-rounds"]:
        stopped = None if state.stopped_early is None else state.stopped_early.reason
        raise SuperLinkError(
            f"{label} run {result.run_id} did not complete all rounds "
            f"({len(rounds)} done; stopped early: {stopped}). Log: {out / 'run.log'}"
        )
    return ModeResult(
        secure=secure,
        run_id=result.run_id,
        run_wall_s=result.wall_s,
        rounds=rounds,
        setup_rounds=setup_rounds_of(rounds, secure),
        messages=messages_per_round(deployment, result.run_id),
        clientapp_s=clientapp_seconds(deployment, result.run_id),
        protocol_cpu=cpu_per_round(ledgers, result.run_id, training=False),
        train_cpu=cpu_per_round(ledgers, result.run_id, training=True),
    )


def _bytes_up(mode: ModeResult, setup: bool | None) -> list[float]:
    """``costs[site].bytes_up`` for every (hospital, round), restricted to setup/steady rounds."""
    values = []
    for record in mode.rounds:
        if setup is not None and (record.round in mode.setup_rounds) != setup:
            continue
        if record.costs is None:
            raise SuperLinkError(f"round {record.round} of run {mode.run_id} records no costs (not a Flower run)")
        values += [c.bytes_up for c in record.costs.values()]
    return values


def _per_site_rounds(table: dict[str, dict[int, float]], mode: ModeResult, setup: bool | None) -> list[float]:
    return [
        value
        for per_round in table.values()
        for rnd, value in per_round.items()
        if setup is None or (rnd in mode.setup_rounds) == setup
    ]


def _protocol_cpu(mode: ModeResult, setup: bool | None) -> list[float]:
    return _per_site_rounds(mode.protocol_cpu, mode, setup)


def _train_cpu(mode: ModeResult, setup: bool | None) -> list[float]:
    return _per_site_rounds(mode.train_cpu, mode, setup)


def _round_seconds(mode: ModeResult, setup: bool | None) -> list[float]:
    return [
        r.seconds
        for r in mode.rounds
        if setup is None or (r.round in mode.setup_rounds) == setup
    ]


def _messages(mode: ModeResult, setup: bool | None) -> list[float]:
    return [
        float(n)
        for per_round in mode.messages.values()
        for rnd, n in per_round.items()
        if setup is None or (rnd in mode.setup_rounds) == setup
    ]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "MB":
        return f"{value / 1e6:.3f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def format_table(plain: ModeResult, secure: ModeResult) -> str:
    """The comparison table (medians; per hospital per round unless the row says otherwise)."""
    header = ("", "plain first", "plain steady", "secure setup", "secure steady", "steady ratio")
    rows: list[tuple[str, ...]] = []

    def row(name: str, get: Callable[[ModeResult, bool | None], list[float]], unit: str = "") -> None:
        p1, ps = _median(get(plain, True)), _median(get(plain, False))
        s1, ss = _median(get(secure, True)), _median(get(secure, False))
        rows.append((name, _fmt(p1, unit), _fmt(ps, unit), _fmt(s1, unit), _fmt(ss, unit), _ratio(ss, ps)))

    row("round wall time (s)", _round_seconds)
    row("training CPU / hospital (s)", _train_cpu)
    row("protocol CPU / hospital (s)", _protocol_cpu)
    row("bytes up / hospital (MB)", _bytes_up, "MB")
    row("messages / hospital", _messages)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))

    p_all, s_all = _median(_round_seconds(plain, None)), _median(_round_seconds(secure, None))
    p_steady, s_steady = _median(_round_seconds(plain, False)), _median(_round_seconds(secure, False))
    per_msg = []
    for mode in (plain, secure):
        n = len(mode.messages) * len(mode.rounds)
        per_msg.append(None if mode.clientapp_s is None or not n else mode.clientapp_s / n)
    lines += [
        "",
        f"median round wall time, all rounds: plain {_fmt(p_all)} s, secure {_fmt(s_all)} s, "
        f"ratio {_ratio(s_all, p_all)} (goal ≤ 1.3×); steady rounds only: ratio {_ratio(s_steady, p_steady)}",
        f"ClientApp time / hospital / round (Flower compute-time, all rounds): plain {_fmt(per_msg[0])} s, "
        f"secure {_fmt(per_msg[1])} s",
        "round wall time / training CPU of a hospital (steady medians): plain "
        f"{_ratio(p_steady, _median(_train_cpu(plain, False)))}, "
        f"secure {_ratio(s_steady, _median(_train_cpu(secure, False)))}",
        f"run wall time (submit → finished): plain {_fmt(plain.run_wall_s)} s, secure {_fmt(secure.run_wall_s)} s",
        f"secure setup rounds: {sorted(secure.setup_rounds)}; plain 'first' round: {sorted(plain.setup_rounds)}",
    ]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulation.bench_secagg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sites", type=int, default=5, help="hospitals (SuperNodes), at least 3; default 5")
    p.add_argument("--rounds", type=int, default=3, help="rounds per mode (secure round 1 includes setup); default 3")
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="private D steps per hospital per round; default: the app's train.local-steps",
    )
    p.add_argument("--batch-size", type=int, default=None,
                   help="generated rows per D and G step; default: the app's train.batch-size")
    p.add_argument("--patients-per-site", type=int, default=200, help="phantom patients per hospital; default 200")
    p.add_argument("--images-per-patient", type=int, default=2, help="phantom images per patient; default 2")
    p.add_argument("--epsilon", type=float, default=10.0, help="each hospital's ε budget (node config); default 10")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run; default 1800")
    p.add_argument(
        "--launch", choices=LAUNCHES, default="fork-server",
        help="how each message's ClientApp process starts: 'fork-server' (forked from a process with the "
        "libraries imported, as `medsynth node start` runs it; the default), 'plain' (Flower's flwr-clientapp, "
        "a fresh interpreter per message), or 'both' (each on its own deployment, one after the other)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="keep everything here (sites, Flower homes and logs, both runs' outputs, results.json); "
        "default: a temporary folder that is deleted at the end",
    )
    args = p.parse_args(argv)
    if args.sites < 3:
        p.error("--sites must be >= 3 (secure aggregation's threshold is never below 3)")
    if args.rounds < 1 or any(v is not None and v < 1 for v in (args.local_steps, args.batch_size)):
        p.error("--rounds, --local-steps and --batch-size must be >= 1")
    if args.patients_per_site < 1 or args.images_per_patient < 1 or args.timeout <= 0:
        p.error("--patients-per-site and --images-per-patient must be >= 1 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns the process exit code."""
    args = _parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    keep = args.out is not None
    root = Path(args.out).absolute() if keep else Path(tempfile.mkdtemp(prefix="medsynth-bench-secagg-"))
    t0 = time.monotonic()
    try:
        check_out_dir(root)
        root.mkdir(parents=True, exist_ok=True)
        opts = SimulateOptions(
            out=root,
            sites=args.sites,
            rounds=args.rounds,
            patients_per_site=args.patients_per_site,
            images_per_patient=args.images_per_patient,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
        )
        say(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; writing {args.sites} phantom "
            f"hospitals to {root / 'sites'}")
        source = load_source(opts)
        ledgers = build_sites(opts, source, say=lambda line: say(f"  {line}"))
        sites_dir = root / "sites"
        nodes: dict[str, NodeConfig] = {  # consent to plain aggregation: the plain half of the comparison
            site: deployed_node_config(sites_dir, site, source.class_names, float(args.epsilon)) for site in ledgers
        }
        base_config: dict[str, RunConfigValue] = {
            **opts.overrides(),
            "data.class-names": ",".join(source.class_names),
            "wait-nodes-timeout": 120.0,
        }
        tables: dict[str, tuple[ModeResult, ModeResult]] = {}
        for launch in (("fork-server", "plain") if args.launch == "both" else (args.launch,)):
            say(f"starting the Deployment Engine: 1 SuperLink + {args.sites} SuperNodes on loopback; ClientApps: "
                f"{launch}")
            with LocalDeployment(root / f"flwr-{launch}", nodes, fork_server=launch == "fork-server") as deployment:
                say(f"all {args.sites} SuperNodes online after {time.monotonic() - t0:.0f} s (incl. data); "
                    "plain, then secure, back to back on the same processes")
                plain, secure_result = (
                    run_mode(deployment, secure=secure, out=root / f"out-{launch}-{'secure' if secure else 'plain'}",
                             ledgers=ledgers, base_config=base_config, timeout_s=args.timeout, say=say)
                    for secure in (False, True)
                )
            tables[launch] = (plain, secure_result)
        for launch, (plain, secure_result) in tables.items():
            say("")
            train = opts.run.train
            say(f"{args.sites} hospitals, {args.rounds} rounds per mode, {train.local_steps} local steps, batch "
                f"{train.batch_size}, default model, ClientApps: {launch}; medians per hospital per round; "
                f"load average now {os.getloadavg()[0]:.2f}; total {time.monotonic() - t0:.0f} s")
            say(format_table(plain, secure_result))
        if len(tables) == 2:
            (fp, fs), (pp, ps) = tables["fork-server"], tables["plain"]
            say("")
            say("fork server / plain flwr-clientapp, steady round wall time: plain aggregation "
                f"{_ratio(_median(_round_seconds(fp, False)), _median(_round_seconds(pp, False)))}, secure "
                f"{_ratio(_median(_round_seconds(fs, False)), _median(_round_seconds(ps, False)))}")
        if keep:
            summary = {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "runs": {f"{launch}/{r.label}": {"run_id": r.run_id, "run_wall_s": r.run_wall_s,
                                                 "rounds": [x.to_json() for x in r.rounds],
                                                 "setup_rounds": sorted(r.setup_rounds), "messages": r.messages,
                                                 "clientapp_s": r.clientapp_s, "train_cpu": r.train_cpu}
                         for launch, results in tables.items() for r in results},
            }
            (root / "results.json").write_text(json.dumps(summary, indent=2))
            say(f"details: {root / 'results.json'}")
    except (SuperLinkError, ConfigError) as err:
        print(f"bench_secagg: {err}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
