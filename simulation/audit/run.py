"""The audit runs: train a federation with gradient canaries, score them, and write the findings.

One audited run = :func:`one_run_audit`: the in-process engine (``simulation.fed_inprocess``,
the hospitals' local round, calibration and FedAvg) with :class:`GradientCanaries`, then the
statistics of ``simulation.audit.one_run``. Per seed: the canaries' placement and one shadow
run (no canary in, other coins) are shared by every audited run.

The second part (``AuditOptions.membership``) is membership inference on what is released: its
own federations, trained long enough on their member sets that a non-private run memorizes
(``simulation.audit.mia_runs``), attacked with ``simulation.audit.membership``; one per DP budget
and one non-private control per seed. ``audit.json`` (``common.audit_record``) holds every finding.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.audit_record import AuditFinding, AuditReport, write_audit
from common.config import ConfigError, RunConfig, run_config
from common.dataset import LocalDataset
from common.evaluation.reference import to_model_range, unit_per_image
from common.flower import RunConfigValue
from common.models import build_models
from simulation.audit.canaries import Canaries, GradientCanaries, gradient_probe, place_canaries
from simulation.audit.membership import AttackSettings
from simulation.audit.mia_runs import GridSettings, audit_run
from simulation.audit.one_run import audit_scores
from simulation.fed_inprocess import FedPlan, train_federated
from simulation.partition import split_by_patient
from simulation.presets import load_preset
from simulation.runner import SimulateOptions, check_out_dir, load_source

DEFAULT_CANARIES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class AuditedRun:
    """One training to audit: its label, budget (None: the non-private control) and noise scale (0: broken)."""

    label: str  # e.g. "ε = 1, seed 0"
    epsilon: float | None
    noise_scale: float = 1.0
    kind: str = "dp"  # "dp", "no DP (control)", "broken (σ = 0)"


def placement(sites: Sequence[LocalDataset], plan: FedPlan, canaries: int) -> Canaries:
    """The m quietest coordinates of the initial D (``gradient_probe``), their owners and inclusion bits."""
    netG, netD = build_models(plan.model, seed=plan.seed)  # the initial model train_federated builds
    canaries = min(canaries, sum(p.numel() for p in netD.parameters()))
    loudness = gradient_probe(netG, netD, list(sites), model=plan.model, train=plan.train,
                              sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm, seed=plan.seed)
    return place_canaries(netD, canaries, len(sites), seed=plan.seed * 7919 + 17, loudness=loudness)


def shadow_run(sites: Sequence[LocalDataset], plan: FedPlan, placed: Canaries, out: Path,
               say: Callable[[str], None] = print) -> np.ndarray:
    """U_shadow (m,): the canaries' coordinates' total update in a run with no canary in, other coins,
    and the broken control's noise (σ × 10⁻³), a reference of the patients' own drift."""
    none_in = replace(placed, included=np.zeros_like(placed.included))
    hooks = GradientCanaries(none_in, sample_rate=plan.sample_rate, norm=plan.max_grad_norm, seed=0,
                             noise_scale=BROKEN_NOISE_SCALE, coins=1)
    train_federated(sites, plan, out, say=say, audit=hooks)
    return hooks.total_update()


def one_run_audit(sites: Sequence[LocalDataset], plan: FedPlan, run: AuditedRun, out: Path, placed: Canaries, *,
                  shadow: np.ndarray | None, confidence: float = CONFIDENCE,
                  say: Callable[[str], None] = print) -> AuditFinding:
    """Train ``plan`` over ``sites`` with the canaries ``placed`` and audit the result against ``shadow``."""
    hooks = GradientCanaries(placed, sample_rate=plan.sample_rate, norm=plan.max_grad_norm,
                             seed=plan.seed * 7919 + 18, noise_scale=run.noise_scale)
    t0 = time.monotonic()
    state = train_federated(sites, plan, out, say=say, audit=hooks)
    claimed = None if plan.epsilon is None else max(p.epsilon for p in state.rounds[-1].privacy.values())
    result = audit_scores(hooks.scores(shadow), placed.included, delta=plan.delta, beta=1.0 - confidence)
    detail = (f"{run.kind}; {result.describe()}; q = {plan.sample_rate}, C = {plan.max_grad_norm}, "
              f"{plan.rounds} rounds × {plan.train.local_steps} steps; "
              f"all {result.guesses} right would give {result.ceiling:.2f}; "
              f"score {'|U − U_shadow|' if shadow is not None else '−U'}; {time.monotonic() - t0:.0f} s")
    finding = AuditFinding(attack="one-run", target="DP-SGD updates (global model per round)", run=run.label,
                           claimed_epsilon=claimed, epsilon_lower_bound=result.epsilon_lower_bound,
                           confidence=confidence, auc=None, tpr_at_1pct_fpr=None, tpr_at_01pct_fpr=None,
                           detail=detail)
    return finding


def _prefixed(say: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda line: say(f"[{name}] {line}")


def audit_sites(dataset: Path | None, sites: int, partition: str, seed: int, image_size: int, *,
                max_images: int | None = None, patients_per_site: int = 200) -> list[LocalDataset]:
    """The hospitals ``medsynth simulate`` would make (phantoms when ``dataset`` is None), in model range.

    Patients as the source has them (phantoms: 2 images each; MedMNIST: one image is one patient).
    """
    opts = SimulateOptions(out=Path("unused"), sites=sites, dataset=dataset, partition=partition, seed=seed,
                           max_images=max_images, image_size=image_size, patients_per_site=patients_per_site)
    source = load_source(opts)
    patient_of, _ = source.patient_index()
    out = []
    for idx in split_by_patient(source, sites, partition, seed):
        _, patients = np.unique(patient_of[idx], return_inverse=True)  # (n,) 0..P_site−1
        images = to_model_range(unit_per_image(source.images[idx]), image_size)
        out.append(LocalDataset(images=images, labels=source.labels[idx], patients=patients.astype(np.int64),
                                class_names=source.class_names, patient_identity=source.patient_ids is not None))
    return out


@dataclass(frozen=True)
class AuditOptions:
    """Everything ``medsynth audit`` can be told (``--help`` explains each)."""

    out: Path
    dataset: Path | None = None
    preset: str | None = None
    sites: int = 4
    partition: str = "dirichlet:0.5"
    max_images: int | None = None
    patients_per_site: int = 200
    epsilons: tuple[float, ...] = (10.0, 1.0)
    broken: float | None = 1.0  # claimed ε of the broken control; None: none
    control: bool = True  # the non-private control
    seeds: tuple[int, ...] = (0,)
    rounds: int | None = None
    local_steps: int | None = None
    canaries: int = DEFAULT_CANARIES
    confidence: float = CONFIDENCE
    warm_start: bool = False
    membership: bool = True  # the membership-inference part (its own federations)
    grid: GridSettings = field(default_factory=GridSettings)  # the membership federations' training
    attack_settings: AttackSettings = field(default_factory=AttackSettings)  # the membership attacks' sizes and effort

    @staticmethod
    def from_args(args: argparse.Namespace) -> AuditOptions:
        """The options of a parsed ``medsynth audit`` command line; a malformed list is a ConfigError."""
        try:
            epsilons = tuple(float(e) for e in args.epsilons.split(",") if e.strip())
            seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError as exc:
            raise ConfigError(f"--epsilons and --seeds are comma-separated numbers: {exc}") from exc
        return AuditOptions(out=args.out, dataset=args.dataset, preset=args.preset, sites=args.sites,
                            partition=args.partition, max_images=args.max_images,
                            patients_per_site=args.patients_per_site, epsilons=epsilons,
                            broken=args.broken if args.broken > 0 else None, control=not args.no_control,
                            seeds=seeds, rounds=args.rounds, local_steps=args.local_steps,
                            canaries=DEFAULT_CANARIES if args.canaries is None else args.canaries,
                            confidence=args.confidence, warm_start=args.warm_start,
                            membership=not args.no_membership)

    def check(self) -> None:
        """Refuse settings the audit cannot run with (exit 2)."""
        if any(not e > 0 for e in self.epsilons) or not self.seeds:
            raise ConfigError("--epsilons must be > 0 and --seeds must name at least one seed")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.canaries < 10:
            raise ConfigError(f"--canaries must be at least 10, got {self.canaries}")
        if self.dataset is not None and not self.dataset.is_file():
            raise ConfigError(f"--dataset {self.dataset} is not a file")
        check_out_dir(self.out)

    def run_config(self, seed: int) -> RunConfig:
        """App defaults, the preset, then this audit's rounds, steps, warm start and seed."""
        over: dict[str, RunConfigValue] = dict(load_preset(self.preset)) if self.preset else {}
        if self.rounds is not None:
            over["num-server-rounds"] = self.rounds
        if self.local_steps is not None:
            over["train.local-steps"] = self.local_steps
        if not self.warm_start:
            over["warm-start.budget-share"] = 0.0
        over["seed"] = seed
        return run_config(over)

    def runs(self, seed: int) -> list[AuditedRun]:
        """The audited trainings of one seed: the DP budgets, the non-private and the broken control."""
        runs = [AuditedRun(f"ε = {e:g}, seed {seed}", e) for e in self.epsilons]
        if self.control:
            runs.append(AuditedRun(f"no DP (control), seed {seed}", None, kind="no DP (control)"))
        if self.broken is not None:
            runs.append(AuditedRun(f"broken: ε = {self.broken:g} claimed, no noise, seed {seed}", self.broken,
                                   noise_scale=BROKEN_NOISE_SCALE, kind="broken control (σ × 1e-3)"))
        return runs


# The broken control's σ factor: 0 itself is refused by the accountant's record of a step (a Charge
# needs σ > 0); 10⁻³ leaves σ ≈ 0.003–0.03 at the budgets audited, against a canary of norm C = 1.
BROKEN_NOISE_SCALE = 1e-3


def membership_part(opts: AuditOptions, seed: int,
                    say: Callable[[str], None] = print) -> list[AuditFinding]:
    """Membership inference for one seed: a federation per DP budget (and the non-private control)
    trained on ``opts.grid``'s member patients (default 4 × 128, 24 rounds), attacked on its G, D and synthetic
    set (``mia_runs.audit_run``); each in OUT/membership/<run>/ with its audit.json and report."""
    from common.report.html import write_report

    name = "phantoms" if opts.dataset is None else opts.dataset.stem
    findings: list[AuditFinding] = []
    for epsilon in (*opts.epsilons, *((None,) if opts.control else ())):
        label = f"{'no DP (control)' if epsilon is None else f'ε = {epsilon:g}'}, seed {seed}"
        folder = opts.out / "membership" / _slug(label)
        shutil.rmtree(folder, ignore_errors=True)
        say(f"[membership, {label}] training on the member patients, then attacking")
        findings += audit_run(name, epsilon, seed, opts.grid, opts.attack_settings, folder,
                              data=opts.dataset)
        write_report(folder)
    return findings


def audit(opts: AuditOptions, *, say: Callable[[str], None] = print) -> AuditReport:
    """Every run of ``opts`` for every seed; writes OUT/audit.json (and each run folder's own, with its report)."""
    from common.report.html import write_report

    opts.check()
    findings: list[AuditFinding] = []
    for seed in opts.seeds:
        run = opts.run_config(seed)
        sites = audit_sites(opts.dataset, opts.sites, opts.partition, seed, run.model.image_size,
                            max_images=opts.max_images, patients_per_site=opts.patients_per_site)
        base = FedPlan.from_run(replace(run, train=replace(run.train, device="cpu")), None)
        placed = placement(sites, base, opts.canaries)
        shadow_claim = opts.broken or min(opts.epsilons, default=1.0)
        shadow = shadow_run(sites, replace(base, epsilon=shadow_claim), placed, opts.out / f"shadow-seed{seed}",
                            say=_prefixed(say, f"shadow, seed {seed}"))
        for audited in opts.runs(seed):
            folder = opts.out / _slug(audited.label)
            shutil.rmtree(folder, ignore_errors=True)
            plan = replace(base, epsilon=audited.epsilon)
            finding = one_run_audit(sites, plan, audited, folder, placed, shadow=shadow,
                                    confidence=opts.confidence, say=_prefixed(say, audited.label))
            write_audit(folder, AuditReport((finding,)))
            write_report(folder)
            findings.append(finding)
            say(format_findings([finding]).splitlines()[-1])
        if opts.membership:
            findings += membership_part(opts, seed, say)
    report = AuditReport(tuple(findings))
    opts.out.mkdir(parents=True, exist_ok=True)
    write_audit(opts.out, report)
    return report


def _slug(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "-" for c in label.replace("ε", "eps").replace(" = ", ""))
    return "-".join(part for part in keep.split("-") if part)


def is_one_run(f: AuditFinding, kind: str) -> bool:
    """Whether ``f`` is a one-run audit of an :class:`AuditedRun` of ``kind`` ("dp", "broken", ...):
    :func:`one_run_audit` starts a finding's detail with its run's kind."""
    return f.attack == "one-run" and f.detail.startswith(kind)


def verdict(f: AuditFinding) -> str:
    """What a finding says of the claim: consistent, exceeded, or (a broken control) caught or missed."""
    if f.claimed_epsilon is None:
        return "no claim (control)"
    if is_one_run(f, "broken"):
        return "caught (bound > claim)" if f.exceeds_claim else "NOT caught: the audit is too weak here"
    return "EXCEEDS THE CLAIM" if f.exceeds_claim else "consistent (bound ≤ claim)"


def format_findings(findings: Sequence[AuditFinding]) -> str:
    """The audit's table (Markdown)."""
    lines = ["| attack | target | run | AUC | TPR @ 0.1 % FPR | claimed ε | ε lower bound | confidence | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        claim = "–" if f.claimed_epsilon is None else f"{f.claimed_epsilon:.2f}"
        auc = "–" if f.auc is None else f"{f.auc:.3f}"
        tpr = "–" if f.tpr_at_01pct_fpr is None else f"{f.tpr_at_01pct_fpr:.3f}"
        lines.append(f"| {f.attack} | {f.target} | {f.run} | {auc} | {tpr} | {claim} | {f.epsilon_lower_bound:.2f} | "
                     f"{f.confidence:.2f} | {verdict(f)} |")
    return "\n".join(lines)
