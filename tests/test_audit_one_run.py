"""The one-run audit's statistics on mechanisms whose ε is known (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from simulation.audit.one_run import audit_scores, ceiling, epsilon_lower_bound, p_value

M = 5000  # canaries


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of the Gaussian mechanism, sensitivity 1, noise σ, at δ (Balle & Wang, ICML 2018, Thm 8)."""
    def delta_of(eps: float) -> float:
        lead = stats.norm.cdf(0.5 / sigma - eps * sigma)
        return float(lead - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma))

    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def test_all_guesses_right_at_delta_zero_is_the_ceiling() -> None:
    # p_ε^r = β: r = 100, β = 0.05 → ε = log(β^{1/r} / (1 − β^{1/r})) = 3.4930 (by hand: 0.05^0.01 = 0.970487)
    assert ceiling(100, 0.05) == pytest.approx(3.4930, abs=1e-4)
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(ceiling(100, 0.05), abs=1e-4)
    assert p_value(1000, 100, 100, 3.4930, 0.0) == pytest.approx(0.05, rel=1e-3)


def test_delta_lowers_the_bound() -> None:
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05) < epsilon_lower_bound(1000, 100, 100, 0.0, 0.05)


def test_half_right_shows_nothing() -> None:
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.05) == 0.0


def test_monotone_in_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5, 0.05) for v in range(100, 201, 10)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_randomized_response_is_not_overstated(seed: int) -> None:
    rng = np.random.default_rng(seed)
    included = rng.random(M) < 0.5  # (M,)
    eps = 2.0
    truthful = rng.random(M) < math.exp(eps) / (1 + math.exp(eps))
    scores = np.where(truthful, included, ~included) + 1e-3 * rng.random(M)  # (M,) RR output, ties broken
    result = audit_scores(scores, included, delta=0.0)
    assert 0.5 < result.epsilon_lower_bound <= eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_mechanism_is_not_overstated(seed: int) -> None:
    rng = np.random.default_rng(seed)
    included = rng.random(M) < 0.5
    sigma, delta = 1.0, 1e-5
    scores = included + sigma * rng.standard_normal(M)  # (M,) sensitivity 1
    result = audit_scores(scores, included, delta=delta)
    assert result.epsilon_lower_bound <= _gaussian_epsilon(sigma, delta)  # ≈ 4.4


def test_no_noise_is_caught() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(M) < 0.5
    result = audit_scores(included + 1e-3 * rng.standard_normal(M), included, delta=1e-5)
    assert result.correct == result.guesses
    assert result.epsilon_lower_bound > 5.0  # a claimed ε of 1 or even 5 would be refuted


def test_grid_correction_costs_confidence() -> None:
    # the same all-right guesses at level β / 8 give a smaller bound than at β
    assert epsilon_lower_bound(5000, 2000, 2000, 1e-5, 0.05 / 8) < epsilon_lower_bound(5000, 2000, 2000, 1e-5, 0.05)


def test_the_documented_ceiling_of_2000_canaries() -> None:
    # every canary guessed right (k = 1000 per side) at δ = 1e-5, β = 0.05 over the 8 k of the grid
    rng = np.random.default_rng(0)
    included = rng.permutation(np.arange(2000) < 1000)  # exactly 1000 in, so all 2000 guesses can be right
    result = audit_scores(included + 1e-3 * rng.standard_normal(2000), included, delta=1e-5)
    assert result.guesses == 2000 and result.correct == 2000
    assert result.epsilon_lower_bound == pytest.approx(5.78, abs=0.01) == result.ceiling
