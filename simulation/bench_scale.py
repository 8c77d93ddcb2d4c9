"""Benchmark: how ``medsynth simulate`` scales with the number of virtual hospitals (issue 20).

For each site count it runs one simulation of two rounds (round 1 includes Flower's start-up and
the warm-start round 0; round 2 is the steady round) in a fresh child process and prints:

* set-up: phantom data, every site written as DICOM and prepared (``simulation.runner.build_sites``),
  keys and roster;
* first round: from starting the private SuperLink to the server's ``round 1/2`` line; "to round
  0" is the part of it up to the warm start's line (Flower's start-up, the secure-aggregation
  set-up and round 0, whose G pre-training runs at the server);
* steady round: from ``round 1/2`` to ``round 2/2``;
* peak memory: the largest sum of resident set sizes (RSS) of the child's whole process tree
  (the simulation, the SuperLink, Ray and its workers), sampled every half second. Pages shared
  between processes count once per process, so this overstates what is in use;
* CPU: user + system seconds of every process of the tree (each as last sampled: a process's
  last half second before it exits is missed; all phases), and the
  machine's mean 1-minute load average along the run: on a shared machine the wall times above
  grow with the other jobs' load, the CPU seconds much less.

The run settings are the app's defaults (``[tool.flwr.app.config]``: secure aggregation on, the
model, training and DP settings) except those named on the command line or below: 2 rounds,
``--patients-per-site`` phantom patients per site (default 50). Nothing is evaluated afterwards
(``medsynth simulate`` would evaluate against a fresh phantom population). Times are wall
clock on this machine and are printed, never asserted.

    python -m simulation.bench_scale [--sites 10 20 50 100 500] [--patients-per-site 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import EXIT_INTERRUPTED
from common.flower import sigterm_raises_interrupt

DEFAULT_SITES = (10, 20, 50, 100, 500)
ROUNDS = 2
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class ScaleResult:
    """One simulation's figures (seconds, bytes); None where the run did not get that far."""

    sites: int
    setup_s: float | None
    round0_s: float | None  # start-up and the warm start (round 0), part of the first round
    first_round_s: float | None
    steady_round_s: float | None
    peak_rss_bytes: int
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
    """One look at a process tree: Σ RSS now, and each process's CPU so far (clock ticks)."""

    rss_bytes: int
    cpu_ticks: dict[int, int]


def sample_tree(root: int) -> TreeSample:
    """Σ VmRSS of ``root`` and all its descendants, and their user + system CPU ticks (Linux /proc;
    processes gone meanwhile are skipped)."""
    tree, rss, ticks, todo = _children(), 0, {}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read()
            after = fields[fields.rindex(")") + 2 :].split()  # state is field 3; utime, stime are 14, 15
            ticks[pid] = int(after[11]) + int(after[12])
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                rss += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
    return TreeSample(rss, ticks)


def run_one(sites: int, patients_per_site: int, out: Path, timeout_s: float,
            extra: list[str]) -> ScaleResult:
    """One child simulation of ``sites`` hospitals; samples its process tree's memory meanwhile."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    result_path = out / "bench_scale.json"
    cmd = [sys.executable, "-m", "simulation.bench_scale", "--child", "--sites", str(sites),
           "--patients-per-site", str(patients_per_site), "--out", str(out), "--timeout", str(timeout_s), *extra]
    child = subprocess.Popen(cmd)
    peak = 0
    cpu_ticks: dict[int, int] = {}  # pid → its CPU ticks when last seen
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            now = sample_tree(child.pid)
            peak = max(peak, now.rss_bytes)
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
    return ScaleResult(sites, times.get("setup_s"), times.get("round0_s"), times.get("first_round_s"),
                       times.get("steady_round_s"), peak, cpu, sum(loads) / max(len(loads), 1), code)


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
    opts = SimulateOptions(out=args.out, sites=args.sites, rounds=ROUNDS, patients_per_site=args.patients_per_site,
                           local_steps=args.local_steps, timeout_s=args.timeout,
                           secure_aggregation=False if args.plain_aggregation else None,
                           secagg_degree=_degree(args.secagg_degree, args.sites),
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
        if 1 in marks and 2 in marks:
            times["steady_round_s"] = marks[2] - marks[1]
        result_path.write_text(json.dumps(times))

    with sigterm_raises_interrupt(), LocalSuperLink(opts.out / ".flwr") as link:  # stopped however this ends
        run_app(project_dir(), link, run_config=overrides, num_supernodes=opts.sites,
                num_cpus_per_node=opts.cpus_per_site, log_path=opts.out / "flower.log",
                timeout_s=opts.timeout_s, on_line=on_line)


def _degree(value: str | None, sites: int) -> int | None:
    """``--secagg-degree``: None (the app's default), K, or ``auto`` (``simulation.run_options.auto_degree``)."""
    from simulation.run_options import auto_degree

    return None if value is None else auto_degree(sites) if value == "auto" else int(value)


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=list(DEFAULT_SITES),
                   help=f"site counts, one simulation each; default {' '.join(map(str, DEFAULT_SITES))}")
    p.add_argument("--patients-per-site", type=int, default=50, help="phantom patients per hospital; default 50")
    p.add_argument("--local-steps", type=int, default=None,
                   help="D steps per hospital per round (default: the app's train.local-steps)")
    p.add_argument("--plain-aggregation", action="store_true", help="secure aggregation off (default: on)")
    p.add_argument("--secagg-degree", default=None, metavar="K|auto",
                   help="SecAgg+ neighbours per hospital (secagg.degree; auto: as `simulate --secagg-degree auto`)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-scale"),
                   help="work folder, one sub-folder per site count (emptied first)")
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
    extra = [] if args.local_steps is None else ["--local-steps", str(args.local_steps)]
    extra += ["--plain-aggregation"] if args.plain_aggregation else []
    extra += [] if args.secagg_degree is None else ["--secagg-degree", args.secagg_degree]
    extra += ["--setup-only"] if args.setup_only else []
    extra += [] if args.prepare_parallel is None else ["--prepare-parallel", str(args.prepare_parallel)]
    extra += [] if args.messages_in_flight is None else ["--messages-in-flight", str(args.messages_in_flight)]
    print(f"{ROUNDS} rounds per run, {args.patients_per_site} phantom patients per site, "
          f"{'plain' if args.plain_aggregation else 'secure'} aggregation, other settings the app's defaults; "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    for sites in args.sites:
        with sigterm_raises_interrupt():
            r = run_one(sites, args.patients_per_site, args.out / f"sites-{sites}", args.timeout, extra)
        rows.append(r)
        print(f"[{sites} sites] done: exit {r.exit_code}, {r.cpu_s:.0f} CPU s, mean load {r.mean_load:.1f}",
              flush=True)
    print(f"\n{'sites':>6} {'set-up':>9} {'first round':>12} {'(to round 0)':>13} {'steady round':>13} "
          f"{'peak RSS (tree)':>16} {'CPU (tree)':>11} {'load':>5} {'exit':>5}")
    for r in rows:
        print(f"{r.sites:>6} {_fmt(r.setup_s):>9} {_fmt(r.first_round_s):>12} {_fmt(r.round0_s):>13} "
              f"{_fmt(r.steady_round_s):>13} {r.peak_rss_bytes / 2**30:>14.2f} GB {r.cpu_s:>9.0f} s "
              f"{r.mean_load:>5.1f} {r.exit_code:>5}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what this run started has been stopped (run_one, child_main)
        print("bench_scale: interrupted; the simulation and the Flower and Ray processes it started were stopped",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
