"""Membership inference statistics on known cases (issue 16): AUC, TPR at a low FPR, and the ε lower
bound, which must stay below the ε of a mechanism that has it and catch one without noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from simulation.audit.membership import epsilon_lower_bound, epsilon_lower_bound_at, roc_auc, tpr_at_fpr


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε at δ of a Gaussian mechanism with sensitivity / σ = mu (μ-GDP; Dong, Roth, Su 2022)."""
    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)) - delta
    return float(brentq(excess, 0.0, 50.0))


def test_auc_matches_sklearn_with_ties_and_known_extremes() -> None:
    # prepare: scores on a coarse grid so that ties occur
    rng = np.random.default_rng(0)
    members, non_members = rng.integers(0, 5, 300).astype(float), rng.integers(0, 4, 200).astype(float)
    # act
    auc = roc_auc(members, non_members)
    # assert
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[members, non_members])
    assert auc == pytest.approx(expected, abs=1e-12)
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5


def test_tpr_at_fpr_reads_the_step_roc_without_interpolation() -> None:
    # prepare: 10 non-members 0..9, members 5..14
    members, non_members = np.arange(5, 15, dtype=float), np.arange(10, dtype=float)
    # act / assert: FPR ≤ 10 % allows one false positive (score 9): t ∈ (8, 9], members ≥ 9 → 6/10
    assert tpr_at_fpr(members, non_members, 0.1) == 0.6
    # FPR ≤ 1 % of 10 non-members allows none: t > 9 → members 10..14
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5
    assert tpr_at_fpr(members, non_members, 1.0) == 1.0


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_randomized_response_gives_a_bound_at_most_its_epsilon(eps: float) -> None:
    # prepare: ε-DP randomized response: a member says 1 w.p. e^ε/(1+e^ε), a non-member w.p. 1/(1+e^ε)
    rng = np.random.default_rng(1)
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(20000) < p).astype(float)
    non_members = (rng.random(20000) < 1 - p).astype(float)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0, delta=0.0)
    # assert: valid, and tight to within the sampling error of 10,000 evaluation draws per side
    assert bound.epsilon <= eps
    assert bound.epsilon >= 0.85 * eps


def test_gaussian_shift_gives_a_bound_at_most_the_mechanisms_epsilon() -> None:
    # prepare: scores of a Gaussian mechanism, members shifted by μ = 2 (μ-GDP)
    rng = np.random.default_rng(2)
    mu, delta = 2.0, 1e-5
    members, non_members = rng.normal(mu, 1.0, 20000), rng.normal(0.0, 1.0, 20000)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0, delta=delta)
    # assert: below the true ε(δ = 1e-5) of 2-GDP (≈ 10.0); 10,000 evaluated draws per side reach
    # only the tail FPR ≈ 1e-4, where the ratio of the two densities is e^≈4.5
    true_eps = gaussian_epsilon(mu, delta)
    assert true_eps == pytest.approx(10.0, abs=0.01)
    assert 3.5 < bound.epsilon <= true_eps


def test_a_mechanism_without_noise_is_caught_up_to_the_sample_size() -> None:
    # prepare: perfectly separated scores of 400 members and 400 non-members (no noise at all)
    members, non_members = np.arange(400, 800, dtype=float), np.arange(400, dtype=float)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0)
    # assert: 200 vs 200 evaluated, all correct: log((p - δ)/(1 - p)), p = 0.025^(1/200) (Clopper–Pearson)
    p = 0.025 ** (1 / 200)
    assert bound.epsilon == pytest.approx(math.log((p - 1e-5) / (1 - p)), abs=1e-9)
    assert bound.epsilon > 3.5  # well above ε = 1: a claim of ε = 1 would be refuted
    assert (bound.true_positives, bound.false_positives) == (200, 0)


def test_identical_distributions_give_about_zero() -> None:
    # prepare: members and non-members from one distribution
    rng = np.random.default_rng(3)
    members, non_members = rng.normal(size=500), rng.normal(size=500)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0)
    # assert
    assert bound.epsilon < 0.1


def test_counts_bound_is_monotone_and_zero_without_evidence() -> None:
    # act
    none = float(epsilon_lower_bound_at(50, 100, 50, 100))
    more = epsilon_lower_bound_at(np.array([60, 80, 100]), 100, 0, 100)
    # assert
    assert none == 0.0
    assert np.all(np.diff(more) > 0)
