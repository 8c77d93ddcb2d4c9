"""Benchmark: the one-run privacy audit (``medsynth audit``) on PneumoniaMNIST and on the phantoms.

Issue 16's runs: ε = 10, ε = 1, a non-private control and a broken control (the ε = 1
training with the noise switched off, σ × 10⁻³, the claim kept), three seeds, 4 hospitals
(Dirichlet 0.5), each seed with its own canary placement and shadow run. Shorter than the
quality preset so that all of it fits in about an hour on 2 cores: ``--rounds`` (default 1)
rounds of ``--local-steps`` (default 50) D steps, no warm start (the whole budget goes to the
audited DP-SGD steps). What is audited is then the first round's DP-SGD of the tuned recipe
(PneumoniaMNIST: the preset's batch 128 and q = 0.11; phantoms: the app defaults), at a σ
calibrated so the planned round ends at ε; a longer run is audited the same way with
``medsynth audit --rounds R``.

Then (unless ``--no-membership``) the membership-inference part of ``medsynth audit``: per seed,
a federation per budget and a non-private control on 4 × 32 member patients, attacked on the
released G, D and synthetic set (``simulation.audit.mia_runs``; 5-12 min each on 2 shared cores,
so the whole benchmark takes hours, not the issue's hour: ``--no-membership`` keeps the one-run
part, about 40 min).

Prints one Markdown table per data set (claimed ε, lower bound at 95 %, verdict) and writes
OUT/bench_audit.md and each data set's audit.json under OUT/<data set>/.

    python -m simulation.bench_audit [--seeds 0,1,2] [--rounds 1] [--local-steps 50] [--no-membership] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from simulation.audit.run import AuditOptions, audit, format_findings
from simulation.bench_quality import DATA


def _say(name: str) -> Callable[[str], None]:
    return lambda line: print(f"[{name}] {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.bench_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST .npz (default: ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-audit"), help="results folder")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per run (default: 1)")
    p.add_argument("--local-steps", type=int, default=50, help="D steps per round (default: 50)")
    p.add_argument("--sets", default="phantoms,pneumoniamnist", help="data sets (default: phantoms,pneumoniamnist)")
    p.add_argument("--no-membership", action="store_true", help="skip the membership-inference part")
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.monotonic()
    tables = []
    for name in args.sets.split(","):
        if name == "pneumoniamnist" and not args.data.is_file():
            print(f"error: {args.data} not found (see ../shared/data/README.md)", file=sys.stderr)
            return 2
        opts = AuditOptions(out=args.out / name, dataset=args.data if name == "pneumoniamnist" else None,
                            preset="pneumoniamnist" if name == "pneumoniamnist" else None, seeds=seeds,
                            rounds=args.rounds, local_steps=args.local_steps, membership=not args.no_membership)
        t_set = time.monotonic()
        report = audit(opts, say=_say(name))
        tables.append(f"### {name} ({(time.monotonic() - t_set) / 60:.1f} min)\n\n{format_findings(report.findings)}")
        print(tables[-1], flush=True)
    text = "\n\n".join(tables)
    total = (time.monotonic() - t0) / 60
    print(f"\n{text}\n\nTotal wall time {total:.1f} min (goal: 60 min on 2 cores); load average "
          f"{os.getloadavg()[0]:.2f}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_audit.md").write_text(text + f"\n\nTotal {total:.1f} min.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
