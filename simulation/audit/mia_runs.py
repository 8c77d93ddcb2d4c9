"""The membership-inference grid of issue 16: train small federations in process, attack what they release.

For each data set × run kind × seed: a member / non-member split by patient of the data set's
training population, 4 hospitals trained on the members only through the in-process engine
(``simulation.fed_inprocess``: the hospitals' local round, σ calibration and FedAvg, without
Flower or secure aggregation, which change neither the model nor the privacy arithmetic), then
every attack of :mod:`simulation.audit.membership` on the final G, D and a synthetic set, with
the held-out non-members and a reference set disjoint from both. Each run folder gets
``audit.json`` (``common.audit_record``); the grid prints one Markdown table.

Data sets:

* ``pneumonia``: PneumoniaMNIST's training split (one image per patient, as MedMNIST has no
  patient ids) shuffled with the seed: the first ``sites × members_per_site`` images are the
  members, dealt round-robin to the hospitals, the next ``non_members`` the non-members; the
  test split is the reference.
* ``phantoms``: a phantom population (``simulation.phantoms``, 2 images per patient) of members
  and non-members; the first ``sites × members_per_site`` patients (by the seed's shuffle) are
  members, the rest non-members;
  each patient is queried with its first image (a member's is one it trained on); the
  reference is a population drawn with another seed. Pixels: the CT soft-tissue window
  (center 40, width 400, PS3.3 LINEAR) to [0, 1], then the model side.

Member set and exposure (default 128 patients per hospital, 512 in all; 24 rounds × 50 local
steps at batch 32, so q = 32/128 = 0.25; 4096 non-members). Near chance an AUC from m members
and n non-members has a standard error of √((m + n + 1) / (12 m n)) (Hanley and McNeil 1982):
0.036 at 128 + 128, where one phantom split alone gave 0.62–0.65 in every run kind, DP or not;
0.018 at 512 + 512; 0.013 at 512 + 4096. The non-members are cheap (queries, not training), and
they make a TPR at 0.1 % FPR measurable: with 512 non-members that rate allows no false positive
at all, and a model that learnt nothing still shows a TPR ≥ 1 % (6 members above every
non-member) with probability about 2⁻⁶ per attack; with 4096 it allows 4. Memorization needs
each member to be seen often: at 6 rounds a non-private run on 512 members was barely above
chance (D's logit 0.535 on the phantoms, 0.560 on PneumoniaMNIST, seed 0), at 24 rounds 0.586
and 0.678, so the non-private control shows that the attacks work. The DP runs use the same
sites, rounds and q; σ is calibrated so the planned steps end at ε (δ 1e-5). The number of
queries bounds what an attack can show (see ``membership``). The warm start runs with fewer
pre-training steps than the app's (``--pretrain-steps``): the same private release, shorter
pre-training of G.

    python -m simulation.audit.mia_runs [--datasets pneumonia,phantoms] [--kinds none,10,1] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from common.audit_record import AuditFinding, AuditReport, write_audit
from common.config import ConfigError, RunConfig, run_config
from common.dataset import LocalDataset
from common.evaluation.reference import LabelledImages, to_model_range, unit_per_image
from simulation.audit.membership import AttackSettings, MembershipData, membership_findings
from simulation.partition import load_medmnist_npz
from simulation.phantoms import CT_MAPPING, HU_OFFSET, phantom_population
from simulation.presets import load_preset

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
SITES = 4
PHANTOM_REFERENCE_SEED = 1_000_003  # the reference population's seed offset: never a training population


@dataclass(frozen=True, eq=False)
class AuditSplit:
    """The hospitals' training data (members only) and the attack's query and reference images."""

    sites: tuple[LocalDataset, ...]
    data: MembershipData


def _site(images: np.ndarray, labels: np.ndarray, patients: np.ndarray, names: tuple[str, ...]) -> LocalDataset:
    _, index = np.unique(patients, return_inverse=True)
    return LocalDataset(images=images, labels=labels, patients=index.astype(np.int64).reshape(-1),
                        class_names=names, patient_identity=True)


def medmnist_split(npz: Path, members_per_site: int, seed: int, size: int = 32,
                   non_members: int | None = None) -> AuditSplit:
    """Members and non-members (``non_members``, default as many as members) from a MedMNIST
    training split (seeded shuffle), reference its test split."""
    train, test = load_medmnist_npz(npz, "train"), load_medmnist_npz(npz, "test")
    x, y = train.images, train.labels.astype(np.int64)
    n = SITES * members_per_site
    n_out = n if non_members is None else non_members
    if n + n_out > y.size:
        raise ConfigError(f"{npz.name}'s training split has {y.size} images: too few for {n} members and "
                          f"{n_out} non-members (lower --members-per-site or --non-members)")
    order = np.random.default_rng(seed).permutation(y.size)
    members, non = order[:n], order[n : n + n_out]
    images = to_model_range(unit_per_image(x[np.r_[members, non]]), size)  # (n + n_out, 1, S, S)
    names = train.class_names
    sites = tuple(_site(images[:n][i::SITES], y[members][i::SITES], np.arange(n)[i::SITES], names)
                  for i in range(SITES))
    reference = LabelledImages(to_model_range(unit_per_image(test.images), size), test.labels.astype(np.int64))
    return AuditSplit(sites, MembershipData(LabelledImages(images[:n], y[members]),
                                            LabelledImages(images[n:], y[non]), reference))


def phantom_pixels(stored: np.ndarray, size: int) -> np.ndarray:
    """uint16 phantoms (N, H, W) → (N, 1, size, size) in [-1, 1] through the CT soft-tissue window."""
    center, width = CT_MAPPING.window_center or 40.0, CT_MAPPING.window_width or 400.0
    hu = stored.astype(np.float64) - HU_OFFSET
    unit = np.clip((hu - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)  # PS3.3 C.11.2.1.2.1 LINEAR
    return to_model_range(unit, size)


def phantom_split(members_per_site: int, seed: int, size: int = 32, reference_patients: int = 300,
                  non_members: int | None = None) -> AuditSplit:
    """Member / non-member patients (``non_members``, default as many as members) of one phantom
    population; reference: another population."""
    n = SITES * members_per_site
    total = n + (n if non_members is None else non_members)
    source = phantom_population(total, 2, image_size=64, seed=seed)  # 2 images per patient, grouped
    patient = np.repeat(np.arange(total), 2)
    order = np.random.default_rng(seed).permutation(total)
    members, non = order[:n], order[n:]
    pixels = phantom_pixels(source.images, size)
    site_images = [np.flatnonzero(np.isin(patient, members[i::SITES])) for i in range(SITES)]
    sites = tuple(_site(pixels[idx], source.labels[idx], patient[idx], source.class_names) for idx in site_images)

    def first_images(patients: np.ndarray) -> LabelledImages:
        return LabelledImages(pixels[2 * patients], source.labels[2 * patients])

    ref = phantom_population(reference_patients, 2, image_size=64, seed=seed + PHANTOM_REFERENCE_SEED)
    return AuditSplit(sites, MembershipData(first_images(members), first_images(non),
                                            LabelledImages(phantom_pixels(ref.images, size), ref.labels)))


@dataclass(frozen=True)
class GridSettings:
    """The training of every run of the grid (app defaults with the PneumoniaMNIST preset, then these)."""

    members_per_site: int = 128
    rounds: int = 24
    local_steps: int = 50
    batch_size: int = 32
    pretrain_steps: int = 300
    non_members: int = 4096  # queried non-member patients: at 0.1 % FPR 4 false positives are allowed

    def run(self, seed: int) -> RunConfig:
        return run_config({**load_preset("pneumoniamnist"), "num-server-rounds": self.rounds,
                           "train.local-steps": self.local_steps, "train.batch-size": self.batch_size,
                           "dp.sample-rate": round(min(1.0, self.batch_size / self.members_per_site), 4),
                           "warm-start.pretrain-steps": self.pretrain_steps, "seed": seed})


def run_label(epsilon: float | None, dataset: str, seed: int) -> str:
    return f"{dataset}, {'no DP (control)' if epsilon is None else f'ε = {epsilon:g}'}, seed {seed}"


def audit_run(dataset: str, epsilon: float | None, seed: int, grid: GridSettings, attacks: AttackSettings,
              out: Path, data: Path | None = DATA, trained: Path | None = None) -> list[AuditFinding]:
    """Train one federation on the members and attack its release; writes ``out/audit.json``.

    ``dataset``: "phantoms" (``data`` unused), or a name for the MedMNIST ``.npz`` at ``data`` (e.g. "pneumonia").
    ``trained``: a run folder this grid trained before (same data set, kind, seed and grid): attack its
    release instead of training (e.g. with other attack settings)."""
    from simulation.fed_inprocess import FedPlan, train_federated  # torch-heavy: only when training

    label = run_label(epsilon, dataset, seed)

    def say(line: str) -> None:
        print(f"[{label}] {line}", flush=True)

    if dataset == "phantoms":
        split = phantom_split(grid.members_per_site, seed, non_members=grid.non_members)
    elif data is not None:
        split = medmnist_split(data, grid.members_per_site, seed, non_members=grid.non_members)
    else:
        raise ValueError(f"data set {dataset!r} needs the path of its .npz")
    run = grid.run(seed)
    d_steps = run.train.d_steps_per_g if epsilon is not None else 1  # as bench_quality's non-private row
    plan = FedPlan.from_run(replace(run, train=replace(run.train, d_steps_per_g=d_steps, device="cpu")), epsilon)
    t0 = time.monotonic()
    if trained is None:
        train_federated(split.sites, plan, out, say)
        say(f"trained in {time.monotonic() - t0:.0f} s; attacking")
    else:
        say(f"attacking the release trained in {trained}")
    findings = membership_findings(trained or out, split.data, run=label, claimed_epsilon=epsilon, seed=seed,
                                   settings=attacks, say=say)
    out.mkdir(parents=True, exist_ok=True)
    write_audit(out, AuditReport(tuple(findings)))
    return findings


def format_table(findings: Sequence[AuditFinding]) -> str:
    """One Markdown row per finding: run, attack, target, AUC, TPR at 1 % and 0.1 % FPR, ε lower bound."""
    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| run | attack | target | AUC | TPR @ 1 % FPR | TPR @ 0.1 % FPR | ε lower bound (95 %) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {x.run} | {x.attack} | {x.target} | {f(x.auc, '.3f')} | {f(x.tpr_at_1pct_fpr, '.3f')} | "
              f"{f(x.tpr_at_01pct_fpr, '.3f')} | {x.epsilon_lower_bound:.2f} |" for x in findings]
    return "\n".join(lines)


def chosen_datasets(p: argparse.ArgumentParser, text: str, known: tuple[str, str], data: Path) -> list[str]:
    """The comma-separated data sets of ``text`` among ``known`` (the MedMNIST name, then "phantoms");
    an unknown name, or the MedMNIST one without its ``data`` file, is a usage error (exit 2)."""
    names = [n for n in text.split(",") if n]
    if unknown := set(names) - set(known):
        p.error(f"unknown data set(s) {sorted(unknown)}; use {', '.join(known)}")
    if known[0] in names and not data.is_file():
        p.error(f"{data} not found (see ../shared/data/README.md)")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.audit.mia_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g, a = GridSettings(), AttackSettings()
    p.add_argument("--datasets", default="pneumonia,phantoms", help="comma-separated: pneumonia, phantoms")
    p.add_argument("--kinds", default="none,10,1", help="comma-separated ε budgets; 'none' = no DP (default none,10,1)")
    p.add_argument("--seeds", default="0,1,2", help="default 0,1,2")
    p.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST .npz (default ../shared/data/...)")
    p.add_argument("--out", type=Path, default=Path("medsynth-output/audit-mia"), help="results folder")
    p.add_argument("--trained", type=Path, default=None, metavar="DIR",
                   help="attack the runs an earlier call trained into DIR (its --out, same grid) instead of "
                        "training; findings go to --out")
    for name in (f.name for f in fields(GridSettings)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(g, name),
                       help=f"default {getattr(g, name)}")
    for name in ("n_synthetic", "latent_steps", "latent_restarts", "candidates"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(a, name),
                       help=f"default {getattr(a, name)}")
    args = p.parse_args(argv)
    datasets = chosen_datasets(p, args.datasets, ("pneumonia", "phantoms"), args.data)
    grid = GridSettings(**{f.name: getattr(args, f.name) for f in fields(GridSettings)})
    attacks = AttackSettings(n_synthetic=args.n_synthetic, latent_steps=args.latent_steps,
                             latent_restarts=args.latent_restarts, candidates=args.candidates)
    kinds = [None if k == "none" else float(k) for k in args.kinds.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    print(f"grid {grid}, attacks {attacks}; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.monotonic()
    findings: list[AuditFinding] = []
    for dataset in datasets:
        for eps in kinds:
            for seed in seeds:
                where = Path(dataset) / ("nodp" if eps is None else f"eps{eps:g}") / f"seed{seed}"
                findings += audit_run(dataset, eps, seed, grid, attacks, args.out / where, args.data,
                                      trained=None if args.trained is None else args.trained / where)
                (args.out / "audit_mia.md").write_text(format_table(findings) + "\n")
    table = format_table(findings)
    print(f"\n{table}\n\nTotal wall time {(time.monotonic() - t0) / 60:.1f} min; load average "
          f"{os.getloadavg()[0]:.2f}.", flush=True)
    (args.out / "audit_mia.json").write_text(json.dumps({"grid": asdict(grid), "attacks": asdict(attacks), "findings": [
        asdict(x) for x in findings]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
