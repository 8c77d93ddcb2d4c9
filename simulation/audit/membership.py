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
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

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
