"""The statistics of the one-run privacy audit: m canaries, guesses, an ε lower bound.

Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023). Each of
m canaries is included in the training independently with probability 1/2 (S ∈ {−1, +1}^m). An
auditor who sees the output scores every canary, guesses "in" for the k₊ highest scores and
"out" for the k₋ lowest, and abstains on the rest: r = k₊ + k₋ guesses, W of them correct.

Theorem 3 of the paper (the (ε, δ) case): if the training is (ε, δ)-DP with respect to each
canary (adding or removing one canary is a neighbouring input), then for every v

    P[W ≥ v] ≤ f(v) + 2 m δ · max_{i = 1..v} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, p_ε) ≥ v],   p_ε = e^ε / (1 + e^ε)

(p_ε is the accuracy of ε-DP randomized response, the best an auditor can do per guess). Given
the observed v, the lower bound at confidence 1 − β is the largest ε whose p-value (the right
side) is still ≤ β: every smaller ε is rejected at level β. :func:`epsilon_lower_bound` finds it
by bisection; the p-value increases with ε, so the bisection is well defined.

Its ceiling: with all r guesses right and δ = 0 the p-value is p_ε^r, so the bound is the ε with
p_ε^r = β, i.e. ε = log(β^{1/r} / (1 − β^{1/r})): r = 100 at β = 0.05 gives 3.49, r = 1000 gives
5.81 (:func:`ceiling`). A one-run audit cannot show more, whatever the leak.

Choosing k. The paper reports, per experiment, the best bound over a few (k₊, k₋). Taking the
maximum over g choices of k after looking at the scores is a multiple comparison: a union bound
makes each choice's bound valid at confidence 1 − β/g. :func:`audit_scores` applies that
correction (the grid's size divides β), so the reported maximum keeps its stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

K_GRID: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 500, 1000)  # guesses on each side (k₊ = k₋ = k)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W ≥ v] for an (ε, δ)-DP training audited with m canaries and r guesses (Theorem 3)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))  # randomized response's accuracy at ε
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[Bin(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # (v,): P[Bin = v−1], …, P[Bin = 0]
    gaps = np.cumsum(pmf)  # (v,): f(v − i) − f(v) for i = 1..v
    worst = float(np.max(gaps / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float, *, tol: float = 1e-6) -> float:
    """The largest ε rejected at level β: ``p_value(m, r, v, ε, δ) <= β`` (0 when even ε = 0 is not rejected)."""
    if not 0 < beta < 1:
        raise ValueError(f"β must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= beta:  # p-value → 1 as ε → ∞ (f(v) → 1): bracket the bound
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError("the p-value does not reach β: is r > 0?")
    while high - low > tol:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            low = mid
        else:
            high = mid
    return low


def ceiling(r: int, beta: float) -> float:
    """The most a one-run audit with r guesses can show at δ = 0: every guess right, p_ε^r = β."""
    root = beta ** (1.0 / r)
    return math.log(root / (1.0 - root))


@dataclass(frozen=True)
class OneRunResult:
    """The best guess set of one audit: bound, guesses, correct guesses, k per side."""

    epsilon_lower_bound: float
    confidence: float  # 1 − β: the bound's confidence after the correction for the k grid
    canaries: int  # m
    guesses: int  # r = 2k
    correct: int  # v
    k: int
    ceiling: float  # the bound had all r guesses been right (same δ, same grid-corrected level)

    def describe(self) -> str:
        """One line for a finding's ``detail``."""
        return (f"{self.canaries} canaries, best of k+ = k- in the grid: k = {self.k}, {self.guesses} guesses, "
                f"{self.correct} correct (grid-corrected)")


def guesses(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices guessed "in" (the k highest scores) and "out" (the k lowest); abstain on the rest."""
    if not 0 < 2 * k <= scores.size:
        raise ValueError(f"2k must be in (0, m], got k={k}, m={scores.size}")
    order = np.argsort(scores, kind="stable")  # (m,) ascending
    return order[-k:], order[:k]


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float, beta: float = 0.05,
                 k_grid: Sequence[int] = K_GRID) -> OneRunResult:
    """The one-run audit of ``scores`` (m,) against the truth ``included`` (m,) bool; "in" must score high.

    Tries k₊ = k₋ = k for every k of ``k_grid`` with 2k ≤ m, each at level β / (number of k tried)
    (union bound over the choices), and returns the largest bound; at confidence 1 − β overall.
    """
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be (m,), got {scores.shape} and {included.shape}")
    m = scores.size
    ks = [k for k in k_grid if 0 < 2 * k <= m]
    if not ks:
        raise ValueError(f"no k of the grid fits {m} canaries")
    level = beta / len(ks)
    best: OneRunResult | None = None
    for k in ks:
        ins, outs = guesses(scores, k)
        correct = int(included[ins].sum() + (~included[outs]).sum())
        eps = epsilon_lower_bound(m, 2 * k, correct, delta, level)
        if best is None or eps > best.epsilon_lower_bound:
            best = OneRunResult(eps, 1.0 - beta, m, 2 * k, correct, k,
                                ceiling=epsilon_lower_bound(m, 2 * k, 2 * k, delta, level))
    if best is None:
        raise ValueError("no guess set")
    return best
