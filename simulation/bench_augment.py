"""Benchmark: does a small hospital's classifier gain from the federation's synthetic images of its rare class?

Issue 15's experiment: PneumoniaMNIST (``../shared/data/medmnist/pneumoniamnist.npz``), 4 hospitals,
Dirichlet label skew 0.5, the tuned preset (``presets/pneumoniamnist.toml``), patient-level
(ε, δ = 1e-5) per hospital at ε = 10 and ε = 1, seeds 0, 1, 2. For every (ε, seed) a federation is
trained in process (``simulation.fed_inprocess``: the hospitals' local round and noise calibration,
FedAvg in the clear; the privacy arithmetic is the production one, secure aggregation is not run).
Then every hospital trains its own classifier four ways (``common.evaluation.augment``): (a) real
only, (b) real + classic augmentation, (c) real + minority oversampling, (d) real + synthetic
images of its rare class drawn from that federated model, and each is tested on the official
PneumoniaMNIST test split.

The synthetic images cost no extra privacy: the model is the federation's output, which the
hospital's own data trained under its own budget; sampling it is post-processing of a DP release.

Federation training is the expensive part (minutes per run); ``--checkpoints DIR`` reuses runs
already trained into DIR (``DIR/eps<ε>/seed<s>/checkpoints``), training only the missing ones.

    python -m simulation.bench_augment [--epsilons 10,1] [--seeds 0,1,2] [--checkpoints DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.checkpoint import latest_valid_checkpoint
from common.config import CANDIDATES, CLASSIFIER_REPEATS, RunConfig, run_config
from common.dataset import LocalDataset
from common.evaluation.augment import (
    ALL_CLASSES_ARM,
    ARM_TITLES,
    ARMS,
    AugmentSettings,
    Comparison,
    Split,
    balancing_extra,
    compare_arms,
    patient_split,
    rare_class,
)
from simulation.presets import load_preset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
PRESET = "pneumoniamnist"
SITES = 4
PARTITION = "dirichlet:0.5"


def bench_run(seed: int, preset: str = PRESET) -> RunConfig:
    """The app defaults, the preset, the seed (partition, model init, latents)."""
    return run_config({**load_preset(preset), "seed": seed})


def run_folder(root: Path, epsilon: float, seed: int) -> Path:
    """Where the federation of (ε, seed) lives: ``root/eps<ε>/seed<s>``."""
    return root / f"eps{epsilon:g}" / f"seed{seed}"


def ensure_federation(root: Path, epsilon: float, seed: int, data: Path, say: Callable[[str], None],
                      preset: str = PRESET) -> Path:
    """The run folder of (ε, seed), trained in process unless it already holds a finished run."""
    from simulation.fed_inprocess import FedPlan, medmnist_sites, train_federated

    out = run_folder(root, epsilon, seed)
    run = bench_run(seed, preset)
    if (out / "checkpoints").is_dir() and latest_valid_checkpoint(out / "checkpoints") is not None \
            and (out / "server_state.json").is_file():
        say(f"eps={epsilon:g} seed {seed}: reusing {out}")
        return out
    sites = medmnist_sites(data, SITES, PARTITION, seed, run.model.image_size)
    plan = FedPlan.from_run(replace(run, train=replace(run.train, device="cpu")), epsilon)
    t0 = time.monotonic()
    train_federated(sites, plan, out, say)
    say(f"eps={epsilon:g} seed {seed}: federation trained in {(time.monotonic() - t0) / 60:.1f} min → {out}")
    return out


def official_test(data: Path, image_size: int) -> Split:
    """The official PneumoniaMNIST test split, pixels as the sites' (one image per patient)."""
    from common.evaluation.reference import to_model_range, unit_per_image
    from simulation.partition import load_medmnist_npz

    source = load_medmnist_npz(data, "test")
    images = to_model_range(unit_per_image(source.images), image_size)
    return Split(images, source.labels.astype(np.int64), np.arange(source.labels.size, dtype=np.int64))


@dataclass(frozen=True)
class SiteRow:
    """One hospital of one (ε, seed) federation: its data, its role, and the comparison."""

    epsilon: float
    seed: int
    site: int
    patients: int
    counts: tuple[int, ...]
    roles: tuple[str, ...]  # "most skewed", "smallest"
    comparison: Comparison
    sample_s: float
    compare_s: float
    val_rare: int = 0  # rare-class images in the validation split, which picks each classifier's step


def site_roles(sites: Sequence[LocalDataset]) -> list[tuple[str, ...]]:
    """Which hospital is the most skewed (lowest share of its own rarest class) and which the smallest."""
    shares = [np.bincount(s.labels, minlength=s.num_classes).min() / s.labels.size for s in sites]
    sizes = [s.num_patients for s in sites]
    skewed, smallest = int(np.argmin(shares)), int(np.argmin(sizes))
    return [tuple(r for r, hit in (("most skewed", i == skewed), ("smallest", i == smallest)) if hit)
            for i in range(len(sites))]


def compare_sites(run_dir: Path, epsilon: float, seed: int, data: Path, settings: AugmentSettings, *,
                  only: Sequence[int] | str | None, all_classes: bool, chosen: Sequence[str] = (),
                  extra_share: float | None = None, candidates: int = CANDIDATES,
                  say: Callable[[str], None],
                  preset: str = PRESET) -> list[SiteRow]:
    """Every hospital's (a)–(d) on the official test split, the synthetic images from ``run_dir``'s model.

    ``only``: hospital indices, or ``"key"`` for the most skewed and the smallest. ``candidates``: draws per
    synthetic image, the best kept by D's class head (``medsynth node augment --candidates``).
    """
    from common.checkpoint_model import load_generator
    from simulation.fed_inprocess import medmnist_sites

    run = bench_run(seed, preset)
    sites = medmnist_sites(data, SITES, PARTITION, seed, run.model.image_size)
    test = official_test(data, run.model.image_size)
    generator = load_generator(run_dir)
    roles = site_roles(sites)
    rows = []
    for i, site in enumerate(sites):
        if (only == "key" and not roles[i]) or (not isinstance(only, str) and only is not None and i not in only):
            continue
        whole = Split(site.images, site.labels, site.patients)
        train_idx, val_idx = patient_split(site.labels, site.patients, (0.8, 0.2), seed)
        train, val = whole.take(train_idx), whole.take(val_idx)
        rare = rare_class(train.labels, site.num_classes)
        extra = balancing_extra(train.labels, site.num_classes, rare) if extra_share is None else \
            max(1, round(extra_share * int((train.labels == rare).sum())))
        t0 = time.monotonic()
        wanted = range(site.num_classes) if all_classes or ALL_CLASSES_ARM in chosen else (rare,)
        synthetic = {c: generator.sample(np.full(extra, c, dtype=np.int64), seed=seed * 1000 + 10 * i + c,
                                         candidates=candidates)
                     for c in wanted}
        t1 = time.monotonic()
        arms = tuple(chosen) if chosen else (*ARMS, ALL_CLASSES_ARM) if all_classes else ARMS
        comparison = compare_arms(train, val, test, site.num_classes, site.class_names, synthetic=synthetic,
                                  rare=rare, extra=extra, arms=arms, settings=settings)
        row = SiteRow(epsilon, seed, i, site.num_patients, tuple(int(v) for v in np.bincount(site.labels)),
                      roles[i], comparison, round(t1 - t0, 1), round(time.monotonic() - t1, 1),
                      val_rare=int((val.labels == rare).sum()))
        rows.append(row)
        say(f"eps={epsilon:g} seed {seed} site-{i} ({', '.join(roles[i]) or '-'}; {site.num_patients} patients "
            f"{list(row.counts)}; rare {site.class_names[rare]} +{extra}, {row.val_rare} in validation) in "
            f"{row.compare_s / 60:.1f} min\n"
            + comparison.format())
    return rows


def format_summary(rows: Sequence[SiteRow]) -> str:
    """One line per hospital and run: the rare class's sensitivity and balanced accuracy of each arm run,
    and the paired difference (d) − (a) (or (e) − (a) when (d) was not run)."""
    head = ("| ε | seed | site | patients (per class) | rare | arms | sens. rare | balanced acc. | "
            "Δ sens. rare vs (a) [95 % CI] | Δ bal. acc. vs (a) [95 % CI] |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c = r.comparison
        names = " / ".join(ARM_TITLES[a.arm][:3] for a in c.arms)
        sens = " / ".join(f"{a.sensitivity[c.rare].value * 100:.1f}" for a in c.arms)
        bal = " / ".join(f"{a.balanced_accuracy.value * 100:.1f}" for a in c.arms)
        d = next((a for a in c.arms if a.arm == "synthetic"), c.arms[-1])
        name = f"site-{r.site}" + (f" ({', '.join(r.roles)})" if r.roles else "") + (
            f" † {r.val_rare} rare in validation" if r.val_rare < FEW_VALIDATION_RARE else "")
        lines.append(f"| {r.epsilon:g} | {r.seed} | {name} | {r.patients} {list(r.counts)} | {c.class_names[c.rare]} "
                     f"+{c.extra} | {names} | {sens} | {bal} | {ARM_TITLES[d.arm][:3]} "
                     f"{d.delta_rare_sensitivity.format() if d.delta_rare_sensitivity else '–'} | "
                     f"{d.delta_balanced_accuracy.format() if d.delta_balanced_accuracy else '–'} |")
    if any(r.val_rare < FEW_VALIDATION_RARE for r in rows):
        lines.append(f"\n† fewer than {FEW_VALIDATION_RARE} rare-class images in the hospital's validation split: "
                     "the step each classifier keeps is close to chance there.")
    return "\n".join(lines)


#: Below this many rare-class validation images the step each classifier keeps (best validation balanced
#: accuracy) is close to chance: such a hospital's row is marked (†) and its sensitivities mean little.
FEW_VALIDATION_RARE = 5


def goal_verdict(rows: Sequence[SiteRow]) -> str:
    """Issue 15's goal at ε = 10 for the most skewed hospital, per seed, stated as met or not."""
    out = []
    for r in rows:
        if r.epsilon != 10 or "most skewed" not in r.roles or not set(ARMS) <= {a.arm for a in r.comparison.arms}:
            continue
        c = r.comparison
        sens = {a: c.arm(a).sensitivity[c.rare].value for a in ARMS}
        bal = {a: c.arm(a).balanced_accuracy.value for a in ARMS}
        met = (sens["synthetic"] - sens["real"] >= 0.10 and bal["synthetic"] >= bal["real"]
               and sens["synthetic"] > sens["classic"] and sens["synthetic"] > sens["oversample"])
        out.append(f"seed {r.seed}, site-{r.site}: rare sensitivity (d) − (a) = "
                   f"{(sens['synthetic'] - sens['real']) * 100:+.1f} points, balanced accuracy (d) − (a) = "
                   f"{(bal['synthetic'] - bal['real']) * 100:+.1f}, (d) above (b) and (c): "
                   f"{sens['synthetic'] > sens['classic'] and sens['synthetic'] > sens['oversample']} → goal "
                   f"{'met' if met else 'NOT met'}")
    return "\n".join(out) or "no ε = 10 run: goal not evaluated"


# (row, that hospital's images corrupted, its prepare step): the step runs at the noisy hospital only, as its own
# ``node prepare --denoise`` would; the other hospitals' caches are untouched.
NOISE_ROWS = (("clean", False, "none"), ("noisy", True, "none"), ("noisy + median3", True, "median3"))


def noisy_sites(data: Path, seed: int, image_size: int, *, site: int, share: float, amount: float,
                denoise_name: str) -> list[LocalDataset]:
    """The benchmark's sites with a ``share`` of hospital ``site``'s images corrupted by salt-and-pepper
    noise (``amount`` of their pixels) on the raw pixels, then, like ``node prepare --denoise``, each of that
    hospital's frames scaled to [0, 1], denoised (``common.denoise``) and resized: what its cache would hold.
    The other hospitals' images are neither corrupted nor denoised (a median filter on a clean archive only
    blurs it)."""
    from common.denoise import denoise, salt_and_pepper
    from common.evaluation.reference import to_model_range, unit_per_image
    from simulation.partition import split_by_patient
    from simulation.runner import SimulateOptions, load_source

    source = load_source(SimulateOptions(out=Path("unused"), sites=SITES, dataset=data, partition=PARTITION,
                                         seed=seed, image_size=image_size))
    rng = np.random.default_rng(seed + 99)
    out = []
    for i, idx in enumerate(split_by_patient(source, SITES, PARTITION, seed)):
        raw = source.images[idx]  # (n, 28, 28) uint8
        if i == site:
            hit = rng.random(idx.size) < share
            raw = raw.copy()
            raw[hit] = salt_and_pepper(raw[hit], amount, rng)
        unit = unit_per_image(raw)
        if i == site and denoise_name != "none":
            unit = np.stack([denoise(f, denoise_name) for f in unit])
        out.append(LocalDataset(images=to_model_range(unit, image_size), labels=source.labels[idx],
                                patients=np.arange(idx.size, dtype=np.int64), class_names=source.class_names,
                                patient_identity=False))
    return out


def noise_experiment(root: Path, epsilon: float, seed: int, data: Path, *, site: int, share: float, amount: float,
                     say: Callable[[str], None], preset: str = PRESET) -> list[tuple[str, dict[str, object]]]:
    """Quality and TSTR of the federation when hospital ``site`` holds noisy images, without and with the
    median step, against the same federation on clean images (``medsynth evaluate``'s metrics)."""
    from common.evaluation.evaluate import EvaluateOptions, evaluate
    from simulation.fed_inprocess import FedPlan, train_federated

    run = bench_run(seed, preset)
    plan = FedPlan.from_run(replace(run, train=replace(run.train, device="cpu")), epsilon)
    rows: list[tuple[str, dict[str, object]]] = []
    for name, noisy, step in NOISE_ROWS:
        out = (root / "noise" / f"site{site}-share{share:g}-amount{amount:g}" / f"eps{epsilon:g}" / f"seed{seed}"
               / name.replace(" + ", "-"))
        if name == "clean":
            out = run_folder(root, epsilon, seed)  # the augment benchmark's own federation
            ensure_federation(root, epsilon, seed, data, say, preset)
        elif not ((out / "checkpoints").is_dir() and latest_valid_checkpoint(out / "checkpoints") is not None):
            sites = noisy_sites(data, seed, run.model.image_size, site=site, share=share if noisy else 0.0,
                                amount=amount, denoise_name=step)
            train_federated(sites, plan, out, say)
        ev = evaluate(EvaluateOptions(checkpoint=out, reference=data, seed=seed, out=out / "evaluation"), say=say)
        rows.append((name, {k: ev.get(k) for k in ("fd", "kid", "tstr_auc", "tstr_acc", "precision", "recall")}))
        say(f"noise row {name}: {rows[-1][1]}")
    return rows


def format_noise(rows: Sequence[tuple[str, dict[str, object]]], site: int, share: float, amount: float) -> str:
    """The noise experiment's table."""
    def f(v: object, fmt: str) -> str:
        return "–" if not isinstance(v, int | float) else format(v, fmt)

    lines = [f"site-{site}: {share:.0%} of its images with {amount:.0%} salt-and-pepper pixels",
             "| federation | FD | KID | TSTR AUC | TSTR ACC |", "|---|---|---|---|---|"]
    for name, e in rows:
        lines.append(f"| {name} | {f(e.get('fd'), '.2f')} | {f(e.get('kid'), '.4f')} | "
                     f"{f(e.get('tstr_auc'), '.3f')} | {f(e.get('tstr_acc'), '.3f')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulation.bench_augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST .npz (default: ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/bench-augment"), help="results folder")
    p.add_argument("--checkpoints", type=Path, default=None, metavar="DIR",
                   help="federations already trained (DIR/eps<ε>/seed<s>/); missing ones are trained into DIR "
                        "(default: OUT/federations)")
    p.add_argument("--epsilons", default="10,1", help="budgets, comma-separated (default: 10,1)")
    p.add_argument("--seeds", default="0,1,2", help="seeds: partition, model init, latents, split (default: 0,1,2)")
    p.add_argument("--sites", default="all",
                   help="'all' (default), 'key' (only the most skewed and the smallest hospital: the large ones "
                        "take the longest to train classifiers on), or indices, e.g. 0,2")
    p.add_argument("--all-classes", action="store_true", help="also arm (e): synthetic images of every class")
    p.add_argument("--arms", default=None,
                   help="only these arms, comma-separated, e.g. real,synthetic-all (default: a-d, and e with "
                        "--all-classes); (a) 'real' is always run, the differences are against it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images")
    p.add_argument("--repeats", type=int, default=CLASSIFIER_REPEATS,
                   help="classifiers per arm and hospital, seeded apart; scores are their mean (default: "
                        f"{CLASSIFIER_REPEATS}, as node train-classifier)")
    p.add_argument("--train-only", action="store_true", help="train the missing federations and stop")
    p.add_argument("--extra-share", type=float, default=None, metavar="R",
                   help="(c) and (d) add R × the hospital's real rare-class training images (default: as many as "
                        "level the rare class with the largest)")
    p.add_argument("--candidates", type=int, default=CANDIDATES, metavar="K",
                   help=f"draws per synthetic image of (d) and (e), the best kept by D's class head; 1: no filter "
                        f"(default: {CANDIDATES}, as node augment)")
    p.add_argument("--noise-site", type=int, default=None, metavar="I",
                   help="instead of the augment table: the noise experiment, hospital I's images partly corrupted "
                        "with salt-and-pepper noise; federations clean, noisy, noisy + median3 (quality and TSTR)")
    p.add_argument("--noise-share", type=float, default=0.3, help="share of that hospital's images corrupted")
    p.add_argument("--noise-amount", type=float, default=0.05, help="share of a corrupted image's pixels hit")
    p.add_argument("--preset", default=PRESET, help=f"run settings presets/NAME.toml (default: {PRESET})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found; the benchmark needs PneumoniaMNIST (see ../shared/data/README.md)",
              file=sys.stderr)
        return 2
    root = args.checkpoints or args.out / "federations"
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    only: Sequence[int] | str | None = (None if args.sites == "all" else args.sites if args.sites == "key"
                                        else [int(x) for x in args.sites.split(",")])
    settings = AugmentSettings(bootstrap=args.bootstrap, repeats=args.repeats)
    chosen = ["real", *(a for a in args.arms.split(",") if a and a != "real")] if args.arms else []

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"PneumoniaMNIST, {SITES} hospitals, {PARTITION}, preset {args.preset}, ε {epsilons}, seeds {seeds}; "
        f"synthetic images best of {args.candidates} draws; {settings.repeats} × classifier {settings.classifier}; "
        f"load average {os.getloadavg()[0]:.2f}")
    t0 = time.monotonic()
    if args.noise_site is not None:
        tables = [format_noise(noise_experiment(root, eps, seed, args.data, site=args.noise_site,
                                                share=args.noise_share, amount=args.noise_amount, say=say,
                                                preset=args.preset), args.noise_site, args.noise_share,
                               args.noise_amount) for eps in epsilons for seed in seeds]
        text = "\n\n".join(tables)
        say(f"\n{text}\nTotal wall time {(time.monotonic() - t0) / 60:.1f} min.")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_augment_noise.md").write_text(text + "\n")
        return 0
    rows: list[SiteRow] = []
    for eps in epsilons:
        for seed in seeds:
            run_dir = ensure_federation(root, eps, seed, args.data, say, args.preset)
            if args.train_only:
                continue
            rows += compare_sites(run_dir, eps, seed, args.data, replace(settings, seed=seed), only=only,
                                  all_classes=args.all_classes, chosen=chosen, extra_share=args.extra_share,
                                  candidates=args.candidates,
                                  say=say, preset=args.preset)
    if args.train_only:
        return 0
    summary = format_summary(rows)
    verdict = goal_verdict(rows)
    say(f"\n{summary}\n\n{NOTICE}\n{verdict}\nTotal wall time {(time.monotonic() - t0) / 60:.1f} min; "
        f"load average {os.getloadavg()[0]:.2f}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_augment.json").write_text(json.dumps(
        {"epsilons": epsilons, "seeds": seeds, "candidates": args.candidates, "notice": NOTICE, "verdict": verdict,
         "rows": [{"epsilon": r.epsilon, "seed": r.seed, "site": r.site, "patients": r.patients,
                   "counts": list(r.counts), "roles": list(r.roles), "val_rare": r.val_rare, "sample_s": r.sample_s,
                   "compare_s": r.compare_s, **r.comparison.to_json()} for r in rows]}, indent=1))
    (args.out / "bench_augment.md").write_text(summary + "\n\n" + NOTICE + "\n" + verdict + "\n")
    return 0


NOTICE = ("No extra privacy cost: each hospital's synthetic images come from the federated model its own data "
          "trained under its own budget (ε per hospital as in the run); sampling it is post-processing. "
          "Tested on the official PneumoniaMNIST test split; percentages; Δ with a paired bootstrap 95 % interval.")


if __name__ == "__main__":
    sys.exit(main())
