"""Black-box membership inference on what a federation releases, and the ε lower bound it implies.

A run releases the final generator G, the global discriminator D (every hospital receives it)
and synthetic images drawn from G. Each attack below scores a query image x from those alone,
plus a *reference* set of real images known to be non-members (the attacker's public data);
a higher score says "x was in the training data". Attacks (targets in brackets):

* **discriminator logit** (discriminator): D's real/fake logit of (x, y). D is trained to call
  the hospitals' images real, so an overfitted D gives its members higher logits. The logit is
  a monotone function of D's loss on x, so both rank queries alike.
* **GAN-Leaks, full black-box** (synthetic set; Chen, Yu, Zhang, Fritz, "GAN-Leaks: a taxonomy
  of membership inference attacks against generative models", CCS 2020): minus the squared pixel
  distance from x to its nearest synthetic image. A memorizing G puts samples next to its
  members.
* **GAN-Leaks, calibrated** (synthetic set): the same distance minus the distance from x to its
  nearest *reference* image. Chen et al. calibrate with a reference generator trained on
  reference data; here the reference images stand in for that generator's samples (no second
  GAN to train), which removes the part of the distance that says "x is a typical/atypical
  image" rather than "x was trained on".
* **GAN-Leaks, partial black-box** (generator): minus min_z ‖G(z, y) − x‖² (plus a small prior
  term on z), z found by Adam from several random starts; G's weights are released, so an
  attacker may search its latent space instead of relying on the drawn samples.
* **DOMIAS** (synthetic set; van Breugel, Sun, Qian, van der Schaar, "Membership inference
  attacks against synthetic data through overfitting detection", AISTATS 2023): the density
  ratio log p_synthetic(x) − log p_reference(x). Densities are Gaussian KDEs (Scott's bandwidth,
  ``scipy.stats.gaussian_kde``) in a low-dimensional space: the first :data:`PCA_DIMS` principal
  components of the pixels, fitted on the reference set alone. Not the domain features of
  ``common.evaluation.features``: that extractor is trained on the data set's *training* split,
  which holds the members, so its feature space could itself separate members from non-members
  and credit the release with a leak the extractor made.

**Member-vs-member control.** Every attack is also evaluated with two random halves of the
members in the roles of members and non-members. Both halves were trained on, so an AUC away
from 0.5 there means the evaluation, not the model, leaks (e.g. members and non-members drawn
from different distributions).

**Statistics.** AUC is the Mann–Whitney statistic (ties count one half). TPR at FPR α is read off
the empirical (step) ROC without interpolation: the highest TPR of a threshold whose empirical
FPR is at most α (with fewer than 1/α non-members that means no false positive at all).

**The ε lower bound** (hypothesis-testing view of DP; Kairouz, Oh, Viswanath, "The composition
theorem for differential privacy", ICML 2015): any membership test against an (ε, δ)-DP
mechanism satisfies TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, so an observed pair
implies ε ≥ max(log((TPR − δ)/FPR), log((1 − FPR − δ)/(1 − TPR))). To make it a valid bound and
not an optimistic one: (1) the threshold is chosen on one random half of the members and
non-members (the one maximising the bound there) and the rates are counted on the other half
only; (2) the rates are replaced by one-sided Clopper–Pearson bounds (TPR from below, FPR from
above), each at level (1 − confidence)/2, so both hold together with probability ≥ confidence
(union bound). The result holds for the *examples audited*: DP protects every individual, and an
attack on a few hundred queries can show at most about log(n) (perfect separation of 200 vs 200
gives ≈ 3.9), so a bound below the claimed ε is evidence of nothing broken, never a proof of
privacy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, gaussian_kde

from common.audit_record import AuditFinding
from common.checkpoint_model import model_config_from_arrays, resolve_checkpoint
from common.config import CANDIDATES, LATENT_SCALE, ModelConfig
from common.evaluation.reference import LabelledImages
from common.models import Discriminator, Generator, build_models, draw_images
from common.weights import load_model_arrays

CONFIDENCE = 0.95  # of every ε lower bound
DELTA = 1e-5  # the runs' δ (pyproject's dp.delta): the bound is for (ε, δ)-DP at this δ
FPR_LOW, FPR_VERY_LOW = 0.01, 0.001  # the two operating points reported
PCA_DIMS = 8  # DOMIAS's density space: principal components of the pixels, fitted on the reference


# ---------------------------------------------------------------------------------------------
# Statistics


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted ½ (Mann–Whitney)."""
    m, n = np.asarray(members, np.float64), np.asarray(non_members, np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("AUC needs at least one member and one non-member score")
    pooled = np.concatenate([m, n])
    order = np.argsort(pooled, kind="mergesort")
    ranks = np.empty(pooled.size)
    sorted_scores = pooled[order]
    # average rank of every tie group (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    group_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(group_rank, counts)
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """The highest TPR of a threshold rule "member iff score ≥ t" whose empirical FPR is ≤ ``fpr``.

    No interpolation between ROC points (conservative): with n non-members, FPR ≤ α allows
    ⌊α·n⌋ false positives, so below 1/n it allows none and t must exceed every non-member score.
    """
    m, n = np.sort(np.asarray(members, np.float64)), np.sort(np.asarray(non_members, np.float64))
    allowed = math.floor(fpr * n.size + 1e-9)  # false positives permitted
    # threshold just above the (allowed+1)-th largest non-member score
    if allowed >= n.size:
        return 1.0
    cut = n[n.size - 1 - allowed]  # scores ≥ t must exclude this one: t > cut
    return float(np.count_nonzero(m > cut) / m.size)


def clopper_pearson(successes: np.ndarray | int, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper–Pearson bounds (lower, upper), each holding with probability ≥ 1 − ``alpha``."""
    k = np.asarray(successes, np.float64)
    low = np.where(k > 0, beta.ppf(alpha, k, trials - k + 1), 0.0)
    high = np.where(k < trials, beta.ppf(1.0 - alpha, k + 1, trials - k), 1.0)
    return np.asarray(low, np.float64), np.asarray(high, np.float64)


def epsilon_from_rates(tpr: np.ndarray | float, fpr: np.ndarray | float, delta: float) -> np.ndarray:
    """ε implied by a (TPR, FPR) pair for (ε, δ)-DP: max of the two hypothesis-testing bounds, ≥ 0."""
    t, f = np.asarray(tpr, np.float64), np.asarray(fpr, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(t - delta > 0, np.log(np.maximum(t - delta, 1e-300) / f), -np.inf)
        second = np.where(1 - f - delta > 0, np.log(np.maximum(1 - f - delta, 1e-300) / (1 - t)), -np.inf)
    out: np.ndarray = np.maximum(np.maximum(first, second), 0.0)
    return out


def epsilon_lower_bound_at(true_pos: np.ndarray | int, members: int, false_pos: np.ndarray | int, non_members: int,
                           *, delta: float = DELTA, confidence: float = CONFIDENCE) -> np.ndarray:
    """ε lower bound at ``confidence`` from counts: Clopper–Pearson TPR from below and FPR from above
    (each at (1 − confidence)/2, union bound), put into :func:`epsilon_from_rates`."""
    alpha = (1.0 - confidence) / 2.0
    tpr_low, _ = clopper_pearson(true_pos, members, alpha)
    _, fpr_high = clopper_pearson(false_pos, non_members, alpha)
    return epsilon_from_rates(tpr_low, fpr_high, delta)


@dataclass(frozen=True)
class EpsilonBound:
    """An ε lower bound with how it was obtained (threshold chosen on one half, counted on the other)."""

    epsilon: float
    threshold: float
    true_positives: int
    members: int  # evaluated members (the second half)
    false_positives: int
    non_members: int  # evaluated non-members (the second half)

    def describe(self) -> str:
        return (f"threshold chosen on half, counted on the other: TP {self.true_positives}/{self.members}, "
                f"FP {self.false_positives}/{self.non_members}")


def _counts_at(scores_sorted: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many scores are ≥ each threshold (scores sorted ascending)."""
    return scores_sorted.size - np.searchsorted(scores_sorted, thresholds, side="left")


def epsilon_lower_bound(members: np.ndarray, non_members: np.ndarray, *, seed: int, delta: float = DELTA,
                        confidence: float = CONFIDENCE) -> EpsilonBound:
    """The ε lower bound of the rule "member iff score ≥ t", valid at ``confidence``.

    Members and non-members are each split at random (``seed``) into a selection half and an
    evaluation half. t is the candidate (every selection-half score) with the largest bound on the
    selection half; the bound reported is computed from the evaluation half's counts alone, so
    choosing t costs nothing in validity.
    """
    rng = np.random.default_rng(seed)
    m, n = np.asarray(members, np.float64), np.asarray(non_members, np.float64)
    if m.size < 2 or n.size < 2:
        raise ValueError("the ε bound needs at least two members and two non-members (one per half)")
    m, n = m[rng.permutation(m.size)], n[rng.permutation(n.size)]
    m_sel, m_eval = np.sort(m[: m.size // 2]), np.sort(m[m.size // 2:])
    n_sel, n_eval = np.sort(n[: n.size // 2]), np.sort(n[n.size // 2:])
    candidates = np.unique(np.concatenate([m_sel, n_sel, [np.inf]]))  # inf: "nobody is a member"
    sel = epsilon_lower_bound_at(_counts_at(m_sel, candidates), m_sel.size, _counts_at(n_sel, candidates),
                                 n_sel.size, delta=delta, confidence=confidence)
    t = float(candidates[int(np.argmax(sel))])
    tp, fp = int(_counts_at(m_eval, np.array([t]))[0]), int(_counts_at(n_eval, np.array([t]))[0])
    eps = float(epsilon_lower_bound_at(tp, m_eval.size, fp, n_eval.size, delta=delta, confidence=confidence))
    return EpsilonBound(eps, t, tp, m_eval.size, fp, n_eval.size)


# ---------------------------------------------------------------------------------------------
# What is released, and the attacks on it


@dataclass(frozen=True, eq=False)
class ReleasedModel:
    """A run's released G and D (eval mode) and their config, as every hospital receives them."""

    generator: Generator
    discriminator: Discriminator
    cfg: ModelConfig

    @staticmethod
    def load(run: Path) -> ReleasedModel:
        """The newest valid checkpoint of a run folder (or a checkpoint file), G and D loaded strictly."""
        ckpt = resolve_checkpoint(run)
        cfg = model_config_from_arrays(ckpt.arrays, len(ckpt.class_names) if ckpt.class_names else None)
        netG, netD = build_models(cfg, seed=0)
        load_model_arrays(netG, netD, ckpt.arrays)
        netG.eval()
        netD.eval()
        return ReleasedModel(netG, netD, cfg)

    @torch.no_grad()
    def sample(self, labels: np.ndarray, *, seed: int, latent_scale: float = LATENT_SCALE,
               candidates: int = CANDIDATES) -> np.ndarray:
        """Synthetic images (n, 1, S, S) for ``labels`` (n,), drawn as ``medsynth sample`` draws them
        (the class filter included: each the best of ``candidates`` draws by D's class head)."""
        gen = torch.Generator().manual_seed(seed)
        y = torch.from_numpy(np.asarray(labels, np.int64))
        out: np.ndarray = draw_images(self.generator, self.discriminator, y, gen, latent_scale=latent_scale,
                                      candidates=candidates).numpy()
        return out


@dataclass(frozen=True, eq=False)
class MembershipData:
    """Query images of known membership, and the attacker's reference images (all (N, 1, S, S) in [-1, 1]).

    ``members`` were in some hospital's training data; ``non_members`` come from the same
    population (the same split of the same data set) but no hospital held them; ``reference`` is
    disjoint from both (e.g. the data set's test split): the attacker's public real images.
    """

    members: LabelledImages
    non_members: LabelledImages
    reference: LabelledImages


@dataclass(frozen=True)
class AttackSettings:
    """Sizes and search effort of the attacks (defaults: the issue-16 grid's)."""

    n_synthetic: int = 2000  # the released synthetic set GAN-Leaks and DOMIAS see
    latent_steps: int = 60  # Adam steps of the partial black-box latent search (0: skip that attack)
    latent_restarts: int = 1
    latent_prior: float = 1e-3  # weight of ‖z‖² in the latent search (keeps z plausible)
    pca_dims: int = PCA_DIMS
    candidates: int = CANDIDATES  # the released set's draws per image, the best kept by D's class head (1: none)


def _nearest_sq_distance(queries: np.ndarray, pool: np.ndarray, batch: int = 256) -> np.ndarray:
    """Squared L2 pixel distance of each query (N, 1, S, S) to its nearest image of ``pool`` (M, 1, S, S) → (N,)."""
    q = torch.from_numpy(queries.reshape(queries.shape[0], -1).astype(np.float32))  # (N, P)
    p = torch.from_numpy(pool.reshape(pool.shape[0], -1).astype(np.float32))  # (M, P)
    out = [torch.cdist(q[i : i + batch], p).min(dim=1).values ** 2 for i in range(0, q.shape[0], batch)]
    return torch.cat(out).double().numpy()


def discriminator_scores(model: ReleasedModel, images: LabelledImages) -> np.ndarray:
    """D's real/fake logit of each (x, y) (N,): higher means "looks like training data"."""
    with torch.no_grad():
        x = torch.from_numpy(images.images)
        y = torch.from_numpy(images.labels) if model.cfg.conditional else None
        logit, _ = model.discriminator(x, y)  # (N,)
    out: np.ndarray = logit.double().numpy()
    return out


def gan_leaks_full_scores(images: LabelledImages, synthetic: np.ndarray) -> np.ndarray:
    """GAN-Leaks full black-box: minus the squared distance to the nearest synthetic image (N,)."""
    return -_nearest_sq_distance(images.images, synthetic)


def gan_leaks_calibrated_scores(images: LabelledImages, synthetic: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """GAN-Leaks calibrated: nearest reference distance minus nearest synthetic distance (N,)."""
    out: np.ndarray = _nearest_sq_distance(images.images, reference) - _nearest_sq_distance(images.images, synthetic)
    return out


def gan_leaks_partial_scores(model: ReleasedModel, images: LabelledImages, settings: AttackSettings,
                             seed: int) -> np.ndarray:
    """GAN-Leaks partial black-box: minus min over z of ‖G(z, y) − x‖² (per pixel mean) (N,).

    z is searched by Adam (lr 0.05) from ``latent_restarts`` random starts, with a small
    ``latent_prior``·‖z‖² term; the best reconstruction error over the restarts is the score.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images.images)  # (N, 1, S, S)
    y = torch.from_numpy(images.labels) if model.cfg.conditional else None
    best = torch.full((x.shape[0],), float("inf"))
    for p in model.generator.parameters():
        p.requires_grad_(False)
    for _ in range(settings.latent_restarts):
        z = torch.randn(x.shape[0], model.cfg.latent_dim, generator=gen).requires_grad_(True)  # (N, latent)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(settings.latent_steps):
            opt.zero_grad()
            err = ((model.generator(z, y) - x) ** 2).mean(dim=(1, 2, 3))  # (N,)
            (err + settings.latent_prior * (z**2).mean(dim=1)).sum().backward()
            opt.step()
        with torch.no_grad():
            best = torch.minimum(best, ((model.generator(z, y) - x) ** 2).mean(dim=(1, 2, 3)))
    return -best.double().numpy()


def _pca(reference: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (P,) and top ``dims`` principal axes (dims, P) of flattened reference images."""
    flat = reference.reshape(reference.shape[0], -1).astype(np.float64)  # (M, P)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return mean, vt[:dims]


def domias_scores(images: LabelledImages, synthetic: np.ndarray, reference: np.ndarray, dims: int) -> np.ndarray:
    """DOMIAS: log p_synthetic(x) − log p_reference(x), Gaussian KDEs in the reference's top-``dims`` PCA space (N,)."""
    mean, axes = _pca(reference, dims)

    def project(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = (a.reshape(a.shape[0], -1).astype(np.float64) - mean) @ axes.T  # (n, dims)
        return out

    q = project(images.images).T  # (dims, N): gaussian_kde's layout
    p_syn = gaussian_kde(project(synthetic).T).logpdf(q)
    p_ref = gaussian_kde(project(reference).T).logpdf(q)
    out: np.ndarray = p_syn - p_ref
    return out


# ---------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Attack:
    """One attack's name and target as the audit record names them."""

    name: str
    target: str


DISCRIMINATOR = Attack("discriminator logit", "discriminator")
GAN_LEAKS_FULL = Attack("GAN-Leaks full black-box", "synthetic set")
GAN_LEAKS_CALIBRATED = Attack("GAN-Leaks calibrated", "synthetic set")
GAN_LEAKS_PARTIAL = Attack("GAN-Leaks partial black-box", "generator")
DOMIAS = Attack("DOMIAS", "synthetic set")
ATTACKS = (DISCRIMINATOR, GAN_LEAKS_FULL, GAN_LEAKS_CALIBRATED, GAN_LEAKS_PARTIAL, DOMIAS)
CONTROL = " (member-vs-member control)"  # appended to the attack's name in a control's finding


def finding(attack: Attack, members: np.ndarray, non_members: np.ndarray, *, run: str,
            claimed_epsilon: float | None, seed: int, control: bool = False, note: str = "") -> AuditFinding:
    """The audit finding of one attack's scores (members positive): AUC, TPR at 1 % and 0.1 % FPR, ε bound."""
    bound = epsilon_lower_bound(members, non_members, seed=seed)
    return AuditFinding(
        attack=attack.name + (CONTROL if control else ""), target=attack.target, run=run,
        claimed_epsilon=claimed_epsilon, epsilon_lower_bound=bound.epsilon, confidence=CONFIDENCE,
        auc=roc_auc(members, non_members), tpr_at_1pct_fpr=tpr_at_fpr(members, non_members, FPR_LOW),
        tpr_at_01pct_fpr=tpr_at_fpr(members, non_members, FPR_VERY_LOW),
        detail=f"{members.size} {'members (half A)' if control else 'members'} vs {non_members.size} "
               f"{'members (half B)' if control else 'non-members'}; {bound.describe()}; δ {DELTA:g}"
               + (f"; {note}" if note else ""))


def attack_scores(model: ReleasedModel, data: MembershipData, *, seed: int,
                  settings: AttackSettings = AttackSettings(),
                  say: Callable[[str], None] = print) -> dict[Attack, tuple[np.ndarray, np.ndarray]]:
    """Each attack's scores of the members and of the non-members (higher: "member")."""
    shares = np.bincount(data.reference.labels, minlength=model.cfg.num_classes) / len(data.reference)
    labels = np.random.default_rng(seed).choice(model.cfg.num_classes, settings.n_synthetic, p=shares)
    synthetic = model.sample(labels, seed=seed, candidates=settings.candidates)  # (n_synthetic, 1, S, S): released
    ref = data.reference.images
    out: dict[Attack, tuple[np.ndarray, np.ndarray]] = {}
    for attack in ATTACKS:
        if attack is GAN_LEAKS_PARTIAL and (settings.latent_steps == 0 or settings.latent_restarts == 0):
            continue
        t0 = time.monotonic()
        pair = []
        for images in (data.members, data.non_members):
            if attack is DISCRIMINATOR:
                pair.append(discriminator_scores(model, images))
            elif attack is GAN_LEAKS_FULL:
                pair.append(gan_leaks_full_scores(images, synthetic))
            elif attack is GAN_LEAKS_CALIBRATED:
                pair.append(gan_leaks_calibrated_scores(images, synthetic, ref))
            elif attack is GAN_LEAKS_PARTIAL:
                pair.append(gan_leaks_partial_scores(model, images, settings, seed))
            else:
                pair.append(domias_scores(images, synthetic, ref, settings.pca_dims))
        out[attack] = (pair[0], pair[1])
        say(f"{attack.name}: scored {len(data.members)} + {len(data.non_members)} queries "
            f"({time.monotonic() - t0:.0f} s)")
    return out


def membership_findings(model: Path | ReleasedModel, data: MembershipData, *, run: str,
                        claimed_epsilon: float | None, seed: int, settings: AttackSettings = AttackSettings(),
                        controls: bool = True, say: Callable[[str], None] = print) -> list[AuditFinding]:
    """Every attack against one run's release: one finding per attack × target, then (``controls``)
    each attack's member-vs-member control (two random halves of the members; AUC ≈ 0.5 expected).

    ``model``: a run folder or checkpoint file (its newest valid checkpoint), or a loaded
    :class:`ReleasedModel`; ``run``: the label findings carry (e.g. "ε = 10, seed 0");
    ``claimed_epsilon``: the ledgers' ε (None for a non-private control); ``seed``: the synthetic
    set's latents and labels, the latent search's starts and every random half.
    """
    released = ReleasedModel.load(model) if isinstance(model, Path) else model
    scores = attack_scores(released, data, seed=seed, settings=settings, say=say)
    findings = [finding(a, m, n, run=run, claimed_epsilon=claimed_epsilon, seed=seed,
                        note=f"{settings.n_synthetic} synthetic images" if a.target == "synthetic set" else "")
                for a, (m, n) in scores.items()]
    if controls:
        half = np.random.default_rng(seed + 1).permutation(len(data.members))
        a_idx, b_idx = half[: half.size // 2], half[half.size // 2:]
        findings += [finding(a, m[a_idx], m[b_idx], run=run, claimed_epsilon=claimed_epsilon, seed=seed,
                             control=True) for a, (m, _) in scores.items()]
    return findings
