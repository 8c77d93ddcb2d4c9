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
  It trains ``--nodp-rounds`` GAN rounds (default 6), not the DP rows' 3: a round costs a DP
  row budget (fewer rounds, less noise per step), the reference nothing, and its TSTR AUC rose
  from 3 rounds to 6. Its exact warm start uses ``--nodp-frequencies`` (default 2000), not the
  app's 500: the DP release's noise grows with √frequencies, an exact release has none, and
  without noise 2000 scored higher (docs/benchmarks.md).
  ``medsynth simulate`` has no non-private mode, on purpose; this row runs in one process, so its
  wall time is not comparable with the Flower rows.

Columns: domain FD and KID (features of a seeded CNN trained on the reference's training split,
not Inception), TSTR AUC/ACC (classifier trained on synthetic images, tested on the real test
split), TRTR AUC/ACC (same classifier on real images; published ResNet-18 baseline AUC 0.944 /
ACC 0.854), memorization rate, wall time (training; evaluation in brackets).

The run settings are the app defaults with the tuned preset (``presets/pneumoniamnist.toml``,
``--preset``) on top; every flag overrides one run key, e.g. ``--rounds 3 --local-steps 50`` for
a quicker check. ``--engine inprocess`` runs
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

import numpy as np

from common.config import RUN_KEYS, RunConfig, run_config
from common.flower import RunConfigValue
from simulation.presets import load_preset
from simulation.runner import SimulateOptions, load_source, simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
BASELINE = "published ResNet-18 on real PneumoniaMNIST (MedMNIST v2): AUC 0.944, ACC 0.854"


PRESET = "pneumoniamnist"  # presets/pneumoniamnist.toml: the tuned run settings

FLAGS: dict[str, str] = {
    # flag (dest) → the run config key it overrides; default: the preset's value, else the app's
    "rounds": "num-server-rounds", "local_steps": "train.local-steps", "batch_size": "train.batch-size",
    "sample_rate": "dp.sample-rate", "d_steps_per_g": "train.d-steps-per-g", "lr_d": "train.lr-d",
    "lr_g": "train.lr-g", "beta1": "train.beta1", "diversity_weight": "train.diversity-weight",
    "aux_classifier": "model.aux-classifier", "g_width": "model.g-width", "d_width": "model.d-width",
    "latent_dim": "model.latent-dim", "max_grad_norm": "dp.max-grad-norm", "delta": "dp.delta",
    "upsample": "model.upsample", "warm_share": "warm-start.budget-share",
    "frequencies": "warm-start.frequencies", "pretrain_steps": "warm-start.pretrain-steps",
    "anchor_weight": "warm-start.anchor-weight",
}


@dataclass(frozen=True)
class BenchSettings:
    """The experiment shared by every row: the run (app defaults with ``overrides``: the preset,
    then flags) and the federation's shape."""

    overrides: tuple[tuple[str, RunConfigValue], ...]  # run config keys over [tool.flwr.app.config]
    sites: int = 4
    partition: str = "dirichlet:0.5"
    nodp_d_steps_per_g: int = 1  # the non-private reference: plain DCGAN (5 lets D win outright without noise)
    nodp_rounds: int = 6  # the non-private reference's rounds: without a budget a round costs it nothing
    nodp_frequencies: int = 2000  # its warm start's features: without noise more features cost nothing
    max_images: int | None = None
    seed: int | None = None  # None: the app's seed

    @property
    def run(self) -> RunConfig:
        """The resolved run (app defaults, overrides, seed)."""
        seed = () if self.seed is None else (("seed", self.seed),)
        return run_config(dict(self.overrides + seed))

    def row_run(self, epsilon: float | None) -> RunConfig:
        """One row's run: a DP row's is :attr:`run`; the non-private reference (``epsilon`` None)
        trains with its own D steps per G step, rounds and warm-start features (module docstring)."""
        run = self.run
        if epsilon is not None:
            return run
        return replace(run, train=replace(run.train, d_steps_per_g=self.nodp_d_steps_per_g),
                       federation=replace(run.federation, num_rounds=self.nodp_rounds),
                       warm_start=replace(run.warm_start, frequencies=self.nodp_frequencies))

    def describe(self) -> dict[str, Any]:
        """Every setting of the run and the experiment, for the log and results JSON."""
        return {**self.run.to_flower(), "sites": self.sites, "partition": self.partition,
                "nodp_d_steps_per_g": self.nodp_d_steps_per_g, "nodp_rounds": self.nodp_rounds,
                "nodp_frequencies": self.nodp_frequencies,
                "max_images": self.max_images}


def run_flower(name: str, epsilon: float, s: BenchSettings, data: Path, out: Path) -> dict[str, Any]:
    """One DP row through ``medsynth simulate`` (secure aggregation), evaluated by the run."""
    summary = simulate(SimulateOptions(
        out=out, sites=s.sites, epsilon=epsilon, seed=s.seed, dataset=data, partition=s.partition,
        max_images=s.max_images, device="cpu", reference=data, extra_config=s.overrides,
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
    run = s.row_run(epsilon)
    sites = medmnist_sites(data, s.sites, s.partition, run.federation.seed, run.model.image_size, s.max_images)
    plan = FedPlan.from_run(replace(run, train=replace(run.train, device="cpu")), epsilon)
    t0 = time.monotonic()
    state = train_federated(sites, plan, out, say)
    train_s = round(time.monotonic() - t0, 1)
    ev = evaluate(EvaluateOptions(checkpoint=out, reference=data, seed=run.federation.seed), say=say)
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


def sample_rate_for(data: Path, sites: int, max_images: int | None, expected_batch: int) -> float:
    """q = min(1, B / mean patients per site) of the benchmark's split, rounded to 4 digits.

    The benchmark's own data are public, so their size may set q here. A deployment must not use a
    hospital's exact count (σ and ε would then depend on it); it uses public approximate sizes.
    """
    if expected_batch < 1:
        raise SystemExit("error: --expected-batch must be at least 1")
    source = load_source(SimulateOptions(out=Path("unused"), sites=sites, dataset=data, max_images=max_images))
    patients = source.labels.size if source.patient_ids is None else np.unique(source.patient_ids).size
    return round(min(1.0, expected_batch * sites / patients), 4)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, BenchSettings]:
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
    p.add_argument("--preset", default=PRESET, help=f"run settings presets/NAME.toml (default: {PRESET})")
    known, _ = p.parse_known_args(argv)
    preset = load_preset(known.preset)
    resolved = run_config(preset).to_flower()
    for dest, key in FLAGS.items():
        kind = _flag if RUN_KEYS[key][2] is bool else RUN_KEYS[key][2]
        p.add_argument(f"--{dest.replace('_', '-')}", type=kind, default=None,
                       help=f"{key} (default: {resolved[key]}, the {'preset' if key in preset else 'app'}'s)")
    shape = BenchSettings(overrides=())
    p.add_argument("--expected-batch", type=int, default=None, metavar="B",
                   help="set dp.sample-rate from the data's size: q = min(1, B / the mean patients per site of the "
                        "split), the rule behind the preset's q (128 / 1177 on PneumoniaMNIST); a simulation knows "
                        "its split, a consortium uses its hospitals' public approximate sizes")
    for dest, kind in (("nodp_d_steps_per_g", int), ("nodp_rounds", int), ("nodp_frequencies", int), ("sites", int),
                       ("partition", str), ("max_images", int)):
        p.add_argument(f"--{dest.replace('_', '-')}", type=kind, default=getattr(shape, dest),
                       help=f"default: {getattr(shape, dest)}")
    args = p.parse_args(argv)
    flags = {key: getattr(args, dest) for dest, key in FLAGS.items() if getattr(args, dest) is not None}
    if args.expected_batch is not None:
        if "dp.sample-rate" in flags:
            p.error("give --sample-rate or --expected-batch, not both")
        flags["dp.sample-rate"] = sample_rate_for(args.data, args.sites, args.max_images, args.expected_batch)
    return args, BenchSettings(overrides=tuple({**preset, **flags}.items()), sites=args.sites,
                               partition=args.partition, nodp_d_steps_per_g=args.nodp_d_steps_per_g,
                               nodp_rounds=args.nodp_rounds, nodp_frequencies=args.nodp_frequencies,
                               max_images=args.max_images)


def main(argv: Sequence[str] | None = None) -> int:
    args, s = parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found; the benchmark needs PneumoniaMNIST (see ../shared/data/README.md)",
              file=sys.stderr)
        return 2
    print(f"settings: {json.dumps(s.describe())}; preset {args.preset}; seeds {args.seeds}; engine {args.engine}; "
          f"load average {os.getloadavg()[0]:.2f}",
          flush=True)
    t0 = time.monotonic()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    settings: list[tuple[str, float | None]] = [
        (f"eps={float(e):g}", float(e)) for e in args.epsilons.split(",") if e.strip()]
    if not args.no_reference_row:
        reference = f"no DP (nD={s.nodp_d_steps_per_g}, {s.nodp_rounds} rounds, {s.nodp_frequencies} frequencies)"
        settings.append((reference, None))
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
    baseline = f"{BASELINE}. " if args.data.name == DATA.name else ""  # a published figure for this data set only
    print(f"\n{table}\n\n{baseline}FD/KID: domain features, not Inception. Total wall time {total / 60:.1f} min "
          f"(goal: 60 min on 2 cores); load average {os.getloadavg()[0]:.2f}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quality.json").write_text(json.dumps(
        {"settings": s.describe(), "preset": args.preset, "seeds": args.seeds, "engine": args.engine,
         "total_s": round(total, 1), "rows": {name: r for name, r in rows}}, indent=1, default=str))
    (args.out / "bench_quality.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
