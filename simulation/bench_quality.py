"""Benchmark: quality, usefulness and memorization of the synthetic images at ε = 10, ε = 1 and without DP.

The reference experiment of issue 6: PneumoniaMNIST (``../shared/data/medmnist/pneumoniamnist.npz``),
4 hospitals, Dirichlet label skew 0.5, patient-level (ε, δ = 1e-5) per hospital, secure
aggregation on. Every row is run once per seed (``--seeds``, default 0, 1, 2: the seed picks the
partition, the model's initial weights and the latents; DP noise always comes from the OS),
followed by the mean of the seeds, with the range of TSTR AUC. Rows:

* ``eps=10`` and ``eps=1``: ``medsynth simulate`` (Flower's Simulation Engine, secure
  aggregation, calibrated σ, ledgers), evaluated against the reference by the run itself
  (``--reference``), so each run folder also holds ``report.html``;
* ``no DP``: the upper reference, the same sites (same subsample, same split, same pixels) and
  settings trained by ``simulation.fed_inprocess`` with plain Adam on D (no clipping, no noise)
  and one D step per G step (``--nodp-d-steps-per-g``): without noise, 5 D steps per G step let
  D win outright (loss_d → 0.01) and G learns nothing, which would not be an upper reference.
  ``medsynth simulate`` has no non-private mode, on purpose; this row runs in one process, so its
  wall time is not comparable with the Flower rows.

Columns: domain FD and KID (features of a seeded CNN trained on the reference's training split,
not Inception), TSTR AUC/ACC (classifier trained on synthetic images, tested on the real test
split), TRTR AUC/ACC (same classifier on real images; published ResNet-18 baseline AUC 0.944 /
ACC 0.854), memorization rate, wall time (training; evaluation in brackets).

Defaults are the tuned settings (README, "Evaluating and exporting synthetic images"); all can be
changed for a quicker check, e.g. ``--rounds 3 --local-steps 50``. ``--engine inprocess`` runs
the DP rows in process too (same privacy arithmetic, no secure aggregation) for tuning.

    python -m simulation.bench_quality [--rounds R] [--local-steps L] [--batch-size B] [--out DIR] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.config import ModelConfig, TrainConfig
from simulation.runner import SimulateOptions, simulate
from simulation.superlink import RunConfigValue

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
BASELINE = "published ResNet-18 on real PneumoniaMNIST (MedMNIST v2): AUC 0.944, ACC 0.854"


@dataclass(frozen=True)
class BenchSettings:
    """The training settings shared by every row (the tuned defaults)."""

    rounds: int = 5  # at a fixed ε, more steps mean more noise per step: 20 rounds scored worse than 5 or 10
    local_steps: int = 100
    batch_size: int = 128
    sample_rate: float = 0.11  # ≈ 128 / 1177, the mean site of a 4-way PneumoniaMNIST split
    d_steps_per_g: int = 5  # the lever under DP (Bie et al. 2023): D keeps up with a G that costs no privacy
    nodp_d_steps_per_g: int = 1  # the non-private reference: plain DCGAN (5 lets D win outright without noise)
    lr_d: float = 2e-4
    lr_g: float = 2e-4
    beta1: float = 0.5
    diversity_weight: float = 10.0  # G's diversity term: without it G drew ~one image per class
    aux_classifier: bool = True
    g_width: int = 32
    d_width: int = 8  # fewer private parameters, less noise in total (‖noise‖ grows with √params)
    latent_dim: int = 64
    max_grad_norm: float = 1.0
    sites: int = 4
    partition: str = "dirichlet:0.5"
    delta: float = 1e-5
    max_images: int | None = None
    seed: int = 0

    def extra_config(self) -> tuple[tuple[str, RunConfigValue], ...]:
        return (("train.lr-d", self.lr_d), ("train.lr-g", self.lr_g), ("train.beta1", self.beta1),
                ("train.diversity-weight", self.diversity_weight), ("model.aux-classifier", self.aux_classifier),
                ("model.g-width", self.g_width), ("model.d-width", self.d_width),
                ("model.latent-dim", self.latent_dim), ("dp.max-grad-norm", self.max_grad_norm))


def run_flower(name: str, epsilon: float, s: BenchSettings, data: Path, out: Path) -> dict[str, Any]:
    """One DP row through ``medsynth simulate`` (secure aggregation), evaluated by the run."""
    summary = simulate(SimulateOptions(
        out=out, sites=s.sites, rounds=s.rounds, epsilon=epsilon, delta=s.delta, seed=s.seed, dataset=data,
        partition=s.partition, max_images=s.max_images, local_steps=s.local_steps, batch_size=s.batch_size,
        sample_rate=s.sample_rate, d_steps_per_g=s.d_steps_per_g, device="cpu", reference=data,
        extra_config=s.extra_config(),
    ), say=lambda line: print(f"[{name}] {line}", flush=True))
    eps = [site["epsilon"] for site in summary["sites"].values()]
    return {"train_s": summary["wall_seconds"], "evaluation": summary.get("evaluation") or {},
            "epsilon_max": max(eps) if eps else None, "secure": summary["secure_aggregation"]}


def run_inprocess(name: str, epsilon: float | None, s: BenchSettings, data: Path, out: Path) -> dict[str, Any]:
    """One row in process (no DP when ``epsilon`` is None), evaluated afterwards."""
    from common.evaluation.evaluate import EvaluateOptions, evaluate
    from simulation.fed_inprocess import FedPlan, medmnist_sites, train_federated

    def say(line: str) -> None:
        print(f"[{name}] {line}", flush=True)

    shutil.rmtree(out, ignore_errors=True)
    sites = medmnist_sites(data, s.sites, s.partition, s.seed, 32, s.max_images)
    plan = FedPlan(
        rounds=s.rounds,
        model=ModelConfig(g_width=s.g_width, d_width=s.d_width, latent_dim=s.latent_dim,
                          aux_classifier=s.aux_classifier),
        train=TrainConfig(local_steps=s.local_steps, batch_size=s.batch_size, lr_d=s.lr_d, lr_g=s.lr_g,
                          d_steps_per_g=s.d_steps_per_g if epsilon is not None else s.nodp_d_steps_per_g,
                          beta1=s.beta1, diversity_weight=s.diversity_weight, device="cpu"),
        sample_rate=s.sample_rate, epsilon=epsilon, delta=s.delta, max_grad_norm=s.max_grad_norm, seed=s.seed,
    )
    t0 = time.monotonic()
    state = train_federated(sites, plan, out, say)
    train_s = round(time.monotonic() - t0, 1)
    ev = evaluate(EvaluateOptions(checkpoint=out, reference=data, seed=s.seed), say=say)
    eps = [p.epsilon for p in state.rounds[-1].privacy.values()] if epsilon is not None else []
    return {"train_s": train_s, "evaluation": ev, "epsilon_max": max(eps) if eps else None, "secure": False}


METRICS = ("fd", "kid", "tstr_auc", "tstr_acc", "trtr_auc", "trtr_acc", "memorization_rate")


def mean_row(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several seeds' rows (each metric; wall times summed), with the TSTR AUC range."""
    def mean(values: list[Any]) -> float | None:
        finite = [float(v) for v in values if v is not None]
        return sum(finite) / len(finite) if finite else None

    evaluation: dict[str, Any] = {k: mean([r["evaluation"].get(k) for r in runs]) for k in (*METRICS, "seconds")}
    aucs = [r["evaluation"]["tstr_auc"] for r in runs if r["evaluation"].get("tstr_auc") is not None]
    evaluation["tstr_auc_range"] = (min(aucs), max(aucs)) if aucs else None
    eps = [r["epsilon_max"] for r in runs if r["epsilon_max"] is not None]
    return {"train_s": sum(r["train_s"] for r in runs), "evaluation": evaluation,
            "epsilon_max": max(eps) if eps else None, "secure": all(r["secure"] for r in runs)}


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The benchmark's one table (Markdown, so it can be pasted into a note as is)."""
    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| run | ε max | FD | KID | TSTR AUC | TSTR ACC | TRTR AUC | TRTR ACC | memorization | wall (eval) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        e = r["evaluation"]
        auc = f(e.get("tstr_auc"), ".3f")
        if e.get("tstr_auc_range") is not None:
            low, high = e["tstr_auc_range"]
            auc = f"**{auc}** ({low:.3f}–{high:.3f})"
        lines.append(
            f"| {name} | {f(r['epsilon_max'], '.2f')} | {f(e.get('fd'), '.2f')} | {f(e.get('kid'), '.4f')} | "
            f"{auc} | {f(e.get('tstr_acc'), '.3f')} | {f(e.get('trtr_auc'), '.3f')} | "
            f"{f(e.get('trtr_acc'), '.3f')} | {f(e.get('memorization_rate'), '.3f')} | "
            f"{r['train_s'] / 60:.1f} min ({f(e.get('seconds'), '.0f')} s) |")
    return "\n".join(lines)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, BenchSettings]:
    d = BenchSettings()
    p = argparse.ArgumentParser(prog="python -m simulation.bench_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST .npz (default: ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-quality"), help="results folder")
    p.add_argument("--epsilons", default="10,1", help="DP rows, comma-separated budgets (default: 10,1)")
    p.add_argument("--no-reference-row", action="store_true", help="skip the non-private row")
    p.add_argument("--seeds", default="0,1,2",
                   help="repeat every row with these seeds (partition, model init, sampling; DP noise is always "
                        "fresh) and add their mean (default: 0,1,2; one seed is not a measurement)")
    p.add_argument("--engine", choices=("flower", "inprocess"), default="flower",
                   help="DP rows through medsynth simulate (default) or in process (tuning)")
    for field, kind in (("rounds", int), ("local_steps", int), ("batch_size", int), ("sample_rate", float),
                        ("d_steps_per_g", int),
                        ("nodp_d_steps_per_g", int),
                        ("lr_d", float), ("lr_g", float), ("beta1", float), ("diversity_weight", float),
                        ("aux_classifier", _flag), ("g_width", int), ("d_width", int),
                        ("latent_dim", int), ("max_grad_norm", float), ("sites", int), ("partition", str),
                        ("delta", float), ("max_images", int)):
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, default=getattr(d, field),
                       help=f"default: {getattr(d, field)}")
    args = p.parse_args(argv)
    fields = {k: getattr(args, k) for k in BenchSettings.__dataclass_fields__ if k != "seed"}
    return args, BenchSettings(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    args, s = parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found; the benchmark needs PneumoniaMNIST (see ../shared/data/README.md)",
              file=sys.stderr)
        return 2
    print(f"settings: {json.dumps(s.__dict__)}; seeds {args.seeds}; engine {args.engine}; "
          f"load average {os.getloadavg()[0]:.2f}",
          flush=True)
    t0 = time.monotonic()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    settings: list[tuple[str, float | None]] = [
        (f"eps={float(e):g}", float(e)) for e in args.epsilons.split(",") if e.strip()]
    if not args.no_reference_row:
        settings.append((f"no DP (nD={s.nodp_d_steps_per_g})", None))
    rows: list[tuple[str, dict[str, Any]]] = []
    for name, eps in settings:
        runs = []
        for seed in seeds:
            label = f"{name} seed {seed}"
            out = args.out / name.split(" ")[0].replace("=", "") / f"seed{seed}"
            seeded = replace(s, seed=seed)
            if eps is None:
                runs.append(run_inprocess(label, None, seeded, args.data, out))
            elif args.engine == "flower":
                runs.append(run_flower(label, eps, seeded, args.data, out))
            else:
                runs.append(run_inprocess(label, eps, seeded, args.data, out))
            rows.append((label, runs[-1]))
        if len(runs) > 1:
            rows.append((f"**{name} mean**", mean_row(runs)))
    table = format_table(rows)
    total = time.monotonic() - t0
    print(f"\n{table}\n\n{BASELINE}. FD/KID: domain features, not Inception. Total wall time {total / 60:.1f} min "
          f"(goal: 60 min on 2 cores); load average {os.getloadavg()[0]:.2f}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quality.json").write_text(json.dumps(
        {"settings": s.__dict__, "seeds": args.seeds, "engine": args.engine, "total_s": round(total, 1),
         "rows": {name: r for name, r in rows}}, indent=1, default=str))
    (args.out / "bench_quality.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
