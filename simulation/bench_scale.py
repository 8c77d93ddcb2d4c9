"""Benchmark: how ``medsynth simulate`` scales with the number of virtual hospitals (issue 20).

For each site count it runs one simulation of ``--rounds`` rounds (default 2; round 1 includes
Flower's start-up and the warm-start round 0; rounds 2 on are steady rounds) in a fresh child
process and prints:

* set-up: phantom data, every site written as DICOM and prepared (``simulation.runner.build_sites``),
  keys and roster;
* first round: from starting the private SuperLink to the server's ``round 1/2`` line; "to round
  0" is the part of it up to the warm start's line (Flower's start-up, the secure-aggregation
  set-up and round 0, whose G pre-training runs at the server);
* steady round: from ``round 1/R`` to ``round R/R`` as the streamed log shows them, over R − 1
  (at the resolution of Flower's log stream and including the checkpoints between them), and
  beside it the median of rounds 2 … R's own ``seconds`` in the server's records
  (``server_state.json``: each round's wall time at the server, exact); secure / plain divides
  the latter. A few-second round varies from round to round by more than a 5 % goal, so a ratio
  at few hospitals wants ``--rounds`` well above 2;
* peak memory: the largest sum, over the child's whole process tree (the simulation, the
  SuperLink, Ray and its workers), of each process's proportional set size (PSS: a page shared
  by k processes counts 1/k in each, so the sum is the memory the tree holds), sampled every half
  second; beside it the same sum of resident set sizes (RSS), which counts a shared page once per
  process (each Ray actor maps torch's libraries) and so overstates what is in use;
* CPU: user + system seconds of every process of the tree (each as last sampled: a process's
  last half second before it exits is missed; all phases), and the
  machine's mean 1-minute load average along the run: on a shared machine the wall times above
  grow with the other jobs' load, the CPU seconds much less.

With ``--aggregation both`` (the default) each site count runs twice, plain aggregation first,
then secure, and the secure row gives secure / plain of the steady round, the two measured side
by side in one invocation (a site count named more than once, ``--sites 5 5 5``, runs the pair
that many times, and each secure row divides by the plain run just before it).

The run settings are the app's defaults (``[tool.flwr.app.config]``: the model, training and DP
settings) except those named on the command line or below: ``--rounds`` rounds, ``--patients-per-site``
phantom patients per site (default 50), and the SecAgg+ graph that ``medsynth simulate
--secagg-degree auto`` picks (``--secagg-degree``, default ``auto``: the complete graph up to 40
hospitals, k = ⌈3·log2 n⌉ neighbours above). Nothing is evaluated afterwards (``medsynth
simulate`` would evaluate against a fresh phantom population). Times are wall clock on this
machine and are printed, never asserted.

    python -m simulation.bench_scale [--sites 5 10 20 50 100 500] [--aggregation both|secure|plain]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import EXIT_INTERRUPTED
from common.flower import sigterm_raises_interrupt

DEFAULT_SITES = (5, 10, 20, 50, 100, 500)
AGGREGATIONS = {"both": ("plain", "secure"), "secure": ("secure",), "plain": ("plain",)}
ROUNDS = 2  # the default: the first round and one steady round
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class ScaleResult:
    """One simulation's figures (seconds, bytes); None where the run did not get that far."""

    sites: int
    aggregation: str  # "secure" or "plain"
    setup_s: float | None
    round0_s: float | None  # start-up and the warm start (round 0), part of the first round
    first_round_s: float | None
    steady_round_s: float | None  # between the log lines, per round
    steady_round_server_s: float | None  # the median of rounds 2 … R's seconds in the server's records
    peak_pss_bytes: int  # Σ PSS over the tree: shared pages split between the processes that map them
    peak_rss_bytes: int  # Σ RSS over the tree: shared pages counted once per process
    cpu_s: float  # user + system CPU of every process of the tree, as last sampled, all phases
    mean_load: float  # the machine's 1-minute load average, sampled along the run (other jobs included)
    exit_code: int


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, …
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


@dataclass
class TreeSample:
    """One look at a process tree: Σ PSS and Σ RSS now, and each process's CPU so far (clock ticks)."""

    pss_bytes: int
    rss_bytes: int
    cpu_ticks: dict[int, int]


def _kib_field(path: str, name: str) -> int:
    """Bytes of the ``name:  N kB`` line of a /proc file (0 if absent)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(name)), 0)


def sample_tree(root: int) -> TreeSample:
    """Σ Pss (``smaps_rollup``) and Σ VmRSS of ``root`` and all its descendants, and their user +
    system CPU ticks (Linux /proc; processes gone meanwhile are skipped)."""
    tree, pss, rss, ticks, todo = _children(), 0, 0, {}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read()
            after = fields[fields.rindex(")") + 2 :].split()  # state is field 3; utime, stime are 14, 15
            ticks[pid] = int(after[11]) + int(after[12])
            rss += _kib_field(f"/proc/{pid}/status", "VmRSS:")
            pss += _kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")
        except (OSError, ValueError, IndexError):
            continue
    return TreeSample(pss, rss, ticks)


def run_one(sites: int, aggregation: str, patients_per_site: int, rounds: int, out: Path, timeout_s: float,
            extra: list[str]) -> ScaleResult:
    """One child simulation of ``sites`` hospitals; samples its process tree's memory meanwhile."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    result_path = out / "bench_scale.json"
    cmd = [sys.executable, "-m", "simulation.bench_scale", "--child", "--sites", str(sites),
           "--patients-per-site", str(patients_per_site), "--rounds", str(rounds), "--out", str(out),
           "--timeout", str(timeout_s), *extra,
           *(["--plain-aggregation"] if aggregation == "plain" else [])]
    child = subprocess.Popen(cmd)
    peak_pss = peak_rss = 0
    cpu_ticks: dict[int, int] = {}  # pid → its CPU ticks when last seen
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not stop.is_set():
            now = sample_tree(child.pid)
            peak_pss, peak_rss = max(peak_pss, now.pss_bytes), max(peak_rss, now.rss_bytes)
            cpu_ticks.update(now.cpu_ticks)
            loads.append(os.getloadavg()[0])
            stop.wait(SAMPLE_EVERY_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = child.wait(timeout=timeout_s + 600)
    except subprocess.TimeoutExpired:
        code = stop_child(child)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main): the child and what it started stop too
        stop_child(child)
        raise
    finally:
        stop.set()
        sampler.join()
    cpu = sum(cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    times = json.loads(result_path.read_text()) if result_path.exists() else {}
    return ScaleResult(sites, aggregation, times.get("setup_s"), times.get("round0_s"), times.get("first_round_s"),
                       times.get("steady_round_s"), times.get("steady_round_server_s"), peak_pss, peak_rss, cpu,
                       sum(loads) / max(len(loads), 1), code)


CHILD_STOP_GRACE_S = 60.0  # the child's SuperLink, Ray and Flower processes stop within ≈ 30 s of SIGTERM


def stop_child(child: subprocess.Popen[bytes]) -> int:
    """SIGTERM the child, which then stops the Flower and Ray processes it started; SIGKILL after
    :data:`CHILD_STOP_GRACE_S` (those may then survive). Its exit code."""
    child.terminate()
    try:
        return child.wait(timeout=CHILD_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def child_main(args: argparse.Namespace) -> None:
    """Inside the child: set-up, then the federation; writes the phase times as they happen."""
    from common.flower import run_app
    from common.round_record import RECORDS_FILE, read_server_state
    from simulation.run_options import secagg_degree_option
    from simulation.runner import (
        ROUND_LINE,
        SimulateOptions,
        build_sites,
        check_out_dir,
        load_source,
        project_dir,
        run_config_for,
    )
    from simulation.superlink import LocalSuperLink

    t0 = time.monotonic()
    opts = SimulateOptions(out=args.out, sites=args.sites, rounds=args.rounds, patients_per_site=args.patients_per_site,
                           local_steps=args.local_steps, timeout_s=args.timeout,
                           secure_aggregation=False if args.plain_aggregation else None,
                           secagg_degree=secagg_degree_option(args.secagg_degree, args.sites),
                           extra_config=() if args.messages_in_flight is None
                           else (("sim.messages-in-flight", args.messages_in_flight),))
    check_out_dir(opts.out)
    source = load_source(opts)
    build_sites(opts, source, say=lambda line: None, parallel=args.prepare_parallel)
    overrides = run_config_for(opts, source.class_names, opts.out / "sites")
    times: dict[str, float] = {"setup_s": time.monotonic() - t0}
    result_path = opts.out / "bench_scale.json"
    result_path.write_text(json.dumps(times))
    if args.setup_only:
        return
    started = time.monotonic()
    marks: dict[int, float] = {}

    def on_line(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match is None:
            return
        marks[0 if match.group(1) is None else int(match.group(1))] = time.monotonic()  # None: round 0
        print(f"[{args.sites} sites] {match.group(0)[:100]}", flush=True)  # the line lists every site
        if 0 in marks:
            times["round0_s"] = marks[0] - started
        if 1 in marks:
            times["first_round_s"] = marks[1] - started
        last = max(marks)
        if 1 in marks and last >= 2:
            times["steady_round_s"] = (marks[last] - marks[1]) / (last - 1)
        result_path.write_text(json.dumps(times))

    with sigterm_raises_interrupt(), LocalSuperLink(opts.out / ".flwr") as link:  # stopped however this ends
        run_app(project_dir(), link, run_config=overrides, num_supernodes=opts.sites,
                num_cpus_per_node=opts.cpus_per_site, log_path=opts.out / "flower.log",
                timeout_s=opts.timeout_s, on_line=on_line)
    state = read_server_state(opts.out / RECORDS_FILE)
    steady = [r.seconds for r in state.rounds if r.round >= 2] if state is not None else []  # rounds 2 … R
    if steady:
        times["steady_round_server_s"] = statistics.median(steady)
        result_path.write_text(json.dumps(times))


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def steady_ratio(rows: list[ScaleResult], r: ScaleResult) -> str:
    """Secure / plain steady round (the server's records) at ``r``'s site count: ``r`` over the plain run of
    that count just before it, when both ran; else blank."""
    before = rows[: next(i for i, row in enumerate(rows) if row is r)]
    plain = next((p for p in reversed(before) if p.sites == r.sites and p.aggregation == "plain"), None)
    if r.aggregation != "secure" or plain is None or not (r.steady_round_server_s and plain.steady_round_server_s):
        return ""
    return f"{r.steady_round_server_s / plain.steady_round_server_s:.2f}×"


def print_table(rows: list[ScaleResult]) -> None:
    print(f"\n{'sites':>6} {'aggregation':>11} {'set-up':>9} {'first round':>12} {'(to round 0)':>13} "
          f"{'steady round':>13} {'(server)':>9} {'secure/plain':>12} {'peak PSS (tree)':>16} {'peak RSS (tree)':>16} "
          f"{'CPU (tree)':>11} {'load':>5} {'exit':>5}")
    for r in rows:
        print(f"{r.sites:>6} {r.aggregation:>11} {_fmt(r.setup_s):>9} {_fmt(r.first_round_s):>12} "
              f"{_fmt(r.round0_s):>13} {_fmt(r.steady_round_s):>13} {_fmt(r.steady_round_server_s):>9} "
              f"{steady_ratio(rows, r):>12} "
              f"{r.peak_pss_bytes / 2**30:>13.2f} GB {r.peak_rss_bytes / 2**30:>13.2f} GB {r.cpu_s:>9.0f} s "
              f"{r.mean_load:>5.1f} {r.exit_code:>5}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=list(DEFAULT_SITES),
                   help=f"site counts, one simulation each; default {' '.join(map(str, DEFAULT_SITES))}")
    p.add_argument("--aggregation", choices=list(AGGREGATIONS), default="both",
                   help="both (default): plain, then secure aggregation at each site count, and their ratio; "
                        "or only one of them")
    p.add_argument("--patients-per-site", type=int, default=50, help="phantom patients per hospital; default 50")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help=f"rounds per run (default {ROUNDS}); the steady round is the median of rounds 2 … R")
    p.add_argument("--local-steps", type=int, default=None,
                   help="D steps per hospital per round (default: the app's train.local-steps)")
    p.add_argument("--plain-aggregation", action="store_true", help=argparse.SUPPRESS)  # the child's
    p.add_argument("--secagg-degree", default="auto", metavar="K|auto",
                   help="SecAgg+ neighbours per hospital (secagg.degree); default auto, as `simulate "
                        "--secagg-degree auto`: the complete graph up to 40 hospitals, ⌈3·log2 n⌉ above")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-scale"),
                   help="work folder, one sub-folder per site count and aggregation (emptied first)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before one simulation is stopped")
    p.add_argument("--setup-only", action="store_true", help="stop each run after the set-up (no Flower)")
    p.add_argument("--prepare-parallel", type=int, default=None,
                   help="sites prepared at once (default: one per core; 1: one after another, as before issue 20)")
    p.add_argument("--messages-in-flight", type=int, default=None, metavar="W",
                   help="a stage's messages pushed at most W at a time (sim.messages-in-flight; 0: all at once; "
                        "default: as `medsynth simulate`, 4 per Ray actor)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.sites = args.sites[0]
        child_main(args)
        return
    if min(args.sites) < 1 or args.patients_per_site < 1 or (args.prepare_parallel or 1) < 1:
        p.error("--sites, --patients-per-site and --prepare-parallel must be >= 1")
    if args.rounds < 2:
        p.error("--rounds must be >= 2: round 1 holds the start-up, the steady round is round 2 on")
    extra = [] if args.local_steps is None else ["--local-steps", str(args.local_steps)]
    extra += ["--secagg-degree", args.secagg_degree]
    extra += ["--setup-only"] if args.setup_only else []
    extra += [] if args.prepare_parallel is None else ["--prepare-parallel", str(args.prepare_parallel)]
    extra += [] if args.messages_in_flight is None else ["--messages-in-flight", str(args.messages_in_flight)]
    modes = AGGREGATIONS[args.aggregation]
    print(f"{args.rounds} rounds per run, {args.patients_per_site} phantom patients per site, {' then '.join(modes)} "
          f"aggregation (secagg.degree {args.secagg_degree}), other settings the app's defaults; "
          f"{os.cpu_count()} cores", flush=True)
    rows: list[ScaleResult] = []
    for i, sites in enumerate(args.sites):
        repeat = args.sites[:i].count(sites)  # a site count named again keeps its earlier runs' folders
        for mode in modes:
            folder = args.out / (f"sites-{sites}-{mode}" + (f"-{repeat + 1}" if repeat else ""))
            with sigterm_raises_interrupt():
                r = run_one(sites, mode, args.patients_per_site, args.rounds, folder, args.timeout, extra)
            rows.append(r)
            print(f"[{sites} sites, {mode}] done: exit {r.exit_code}, {r.cpu_s:.0f} CPU s, "
                  f"mean load {r.mean_load:.1f}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what this run started has been stopped (run_one, child_main)
        print("bench_scale: interrupted; the simulation and the Flower and Ray processes it started were stopped",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
