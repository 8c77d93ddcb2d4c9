"""Benchmark: ``medsynth audit`` on PneumoniaMNIST and on the phantoms, both of its parts.

Issue 16's runs: ε = 10, ε = 1, a non-private control and a broken control (the ε = 1
training with the noise switched off, σ × 10⁻³, the claim kept), three seeds, 4 hospitals
(Dirichlet 0.5), each seed with its own canary placement and shadow run. Shorter than the
quality preset so that all of it fits in an hour on 2 cores: ``--rounds`` (default 1)
rounds of ``--local-steps`` (default 50) D steps, no warm start (the whole budget goes to the
audited DP-SGD steps). What is audited is then the first round's DP-SGD of the tuned recipe
(PneumoniaMNIST: the preset's batch 128 and q = 0.11; phantoms: the app defaults), at a σ
calibrated so the planned round ends at ε; a longer run is audited the same way with
``medsynth audit --rounds R``.

Then (unless ``--no-membership``) the membership-inference part: per seed, a federation per
budget and a non-private control on 4 × 128 member patients (24 rounds), attacked on the released
G, D and synthetic set (``simulation.audit.mia_runs``, about 2 min each on one core).

The data sets run side by side, one process each (``--jobs``, default 2: one per core, one torch
thread each). Prints, per data set, the findings and the goals of issue 16 read off them, and
writes OUT/bench_audit.md and each data set's audit.json under OUT/<data set>/.

    python -m simulation.bench_audit [--seeds 0,1,2] [--rounds 1] [--local-steps 50] [--jobs 2]
        [--no-membership] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.audit_record import AuditFinding
from simulation.audit.membership import CONTROL
from simulation.audit.mia_runs import SITES, chosen_datasets
from simulation.audit.run import AuditOptions, audit, format_findings, is_one_run
from simulation.bench_quality import DATA

# Issue 16's goals for the membership attacks on a DP run (stated at ε = 10, checked at every budget).
AUC_GOAL = 0.55
TPR_AT_01PCT_GOAL = 0.01


def _say(name: str) -> Callable[[str], None]:
    return lambda line: print(f"[{name}] {line}", flush=True)


@dataclass(frozen=True)
class SetResult:
    """One data set's audit as a worker process returns it."""

    name: str
    findings: tuple[AuditFinding, ...]
    minutes: float


def audit_set(name: str, opts: AuditOptions, threads: int) -> SetResult:
    """Run one data set's audit (in a worker process, with ``threads`` torch threads)."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.monotonic()
    report = audit(opts, say=_say(name))
    return SetResult(name, report.findings, (time.monotonic() - t0) / 60)


def chance_se(members: int, non_members: int) -> float:
    """Standard error of an AUC at chance from m members and n non-members (Hanley and McNeil,
    Radiology 1982: the variance is (m + n + 1) / (12 m n) at AUC 0.5)."""
    return math.sqrt((members + non_members + 1) / (12 * members * non_members))


def goals(findings: Sequence[AuditFinding], members: int, non_members: int) -> list[str]:
    """Issue 16's goals read off one data set's findings, one Markdown line each.

    ``members``, ``non_members``: queries per membership run, for the chance level of an AUC."""
    dp = [f for f in findings if is_one_run(f, "dp")]
    broken = [f for f in findings if is_one_run(f, "broken")]
    attacks = [f for f in findings if f.attack != "one-run" and f.auc is not None and not f.attack.endswith(CONTROL)]
    lines = []
    if dp:
        worst = max(dp, key=lambda f: f.epsilon_lower_bound - (f.claimed_epsilon or 0.0))
        lines.append(f"- one-run audit, DP runs: every lower bound ≤ its claim: "
                     f"{'met' if not any(f.exceeds_claim for f in dp) else 'NOT met'} (largest "
                     f"{worst.epsilon_lower_bound:.2f} against {worst.claimed_epsilon or 0.0:.2f}, {worst.run})")
    if broken:
        least = min(broken, key=lambda f: f.epsilon_lower_bound)
        lines.append(f"- one-run audit, broken control caught on every seed: "
                     f"{'met' if all(f.exceeds_claim for f in broken) else 'NOT met'} (bounds "
                     f"{', '.join(f'{f.epsilon_lower_bound:.2f}' for f in broken)} against "
                     f"{least.claimed_epsilon or 0.0:.2f})")
    for eps in sorted({f.claimed_epsilon for f in attacks if f.claimed_epsilon is not None}, reverse=True):
        runs = [f for f in attacks if f.claimed_epsilon == eps]
        auc, tpr = max(f.auc or 0.0 for f in runs), max(f.tpr_at_01pct_fpr or 0.0 for f in runs)
        met = auc <= AUC_GOAL and tpr <= TPR_AT_01PCT_GOAL
        lines.append(f"- membership attacks at ε = {eps:g}: AUC ≤ {AUC_GOAL} and TPR at 0.1 % FPR ≤ "
                     f"{TPR_AT_01PCT_GOAL:.0%}: {'met' if met else 'NOT met'} (largest AUC {auc:.3f}, "
                     f"largest TPR {tpr:.3f}, largest ε bound {max(f.epsilon_lower_bound for f in runs):.2f})")
    control = [f for f in attacks if f.claimed_epsilon is None]
    if control:
        seeds = dict.fromkeys(f.run for f in control)  # one run label per seed, in order
        best = {run: max(f.auc or 0.0 for f in control if f.run == run) for run in seeds}
        line = 0.5 + 3 * chance_se(members, non_members)
        lines.append(f"- membership attacks on the non-private control clearly above chance (best attack per "
                     f"seed ≥ {line:.3f}, 3 standard errors): {'met' if min(best.values()) >= line else 'NOT met'} "
                     f"({', '.join(f'{a:.3f}' for a in best.values())})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.bench_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST .npz (default: ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-audit"), help="results folder")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per one-run audit (default: 1)")
    p.add_argument("--local-steps", type=int, default=50, help="D steps per round (default: 50)")
    p.add_argument("--sets", default="phantoms,pneumoniamnist", help="data sets (default: phantoms,pneumoniamnist)")
    p.add_argument("--jobs", type=int, default=2, help="data sets audited at once, one process each (default: 2)")
    p.add_argument("--no-membership", action="store_true", help="skip the membership-inference part")
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    names = chosen_datasets(p, args.sets, ("pneumoniamnist", "phantoms"), args.data)
    jobs = max(1, min(args.jobs, len(names)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    t0 = time.monotonic()
    options = {name: AuditOptions(out=args.out / name, dataset=args.data if name == "pneumoniamnist" else None,
                                  preset="pneumoniamnist" if name == "pneumoniamnist" else None, seeds=seeds,
                                  rounds=args.rounds, local_steps=args.local_steps,
                                  membership=not args.no_membership) for name in names}
    print(f"auditing {', '.join(names)}: {jobs} at once, {threads} torch thread(s) each", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(audit_set, names, [options[n] for n in names], [threads] * len(names)))
    tables = []
    for r in results:
        grid = options[r.name].grid
        tables.append(f"### {r.name} ({r.minutes:.1f} min)\n\n{format_findings(r.findings)}\n\nGoals:\n\n"
                      + "\n".join(goals(r.findings, SITES * grid.members_per_site, grid.non_members)))
    text = "\n\n".join(tables)
    total = (time.monotonic() - t0) / 60
    print(f"\n{text}\n\nTotal wall time {total:.1f} min (goal: 60 min on 2 cores); load average "
          f"{os.getloadavg()[0]:.2f}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_audit.md").write_text(text + f"\n\nTotal {total:.1f} min.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
