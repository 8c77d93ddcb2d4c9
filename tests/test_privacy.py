"""Accounting: composition across the whole history, calibration, budget checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from common.dp.accounting import (
    BASE_ORDERS,
    Charge,
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    check_budget,
    epsilon_of,
    log_a_int_stable,
)


def _stepwise(history: list[Charge], delta: float, accountant: str) -> float:
    """Independent recomputation: a fresh Opacus accountant stepped once per DP step."""
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for c in history:
        for _ in range(c.steps):
            acc.step(noise_multiplier=c.noise_multiplier, sample_rate=c.sample_rate)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_of_history_equals_stepwise_opacus(accountant: str) -> None:
    history = [Charge(1.0, 0.05, 10), Charge(0.8, 0.04, 7), Charge(1.0, 0.05, 10)]
    assert epsilon_of(history, 1e-5, accountant) == pytest.approx(_stepwise(history, 1e-5, accountant), rel=1e-6)


def test_golden_cumulative_epsilon_against_per_round_accounting() -> None:
    # N=1000, B=32, σ=1, 20 rounds of one epoch (31 steps), δ=1e-5 (PRV): 5.14 vs 1.54
    rounds = [Charge(1.0, 32 / 1000, 31)] * 20
    assert epsilon_of(rounds, 1e-5) == pytest.approx(5.14, abs=0.02)
    assert epsilon_of(rounds[:1], 1e-5) == pytest.approx(1.54, abs=0.02)


def test_calibration_ends_at_never_above_budget() -> None:
    # golden (PRV, δ=1e-5): N=4708, B=64, 20 rounds of one epoch → σ≈0.63 for ε=10
    q, steps = 64 / 4708, 20 * 74
    sigma = calibrate_noise_multiplier([], sample_rate=q, planned_steps=steps, delta=1e-5, budget=10.0)
    eps = epsilon_of([Charge(sigma, q, steps)], 1e-5)
    assert sigma == pytest.approx(0.63, abs=0.01)
    assert 10.0 - 0.05 < eps <= 10.0


@pytest.mark.parametrize(("budget", "q", "steps"),
                         [(0.8, 0.11, 500), (0.8, 0.11, 250), (0.5, 0.11, 500), (2.0, 0.11, 500)])
def test_calibration_lands_inside_the_budget_at_small_epsilon(budget: float, q: float, steps: int) -> None:
    # (0.8, 0.11, 500) once stalled: secant steps crept to ε = 0.80001 from above and never landed
    sigma = calibrate_noise_multiplier([], sample_rate=q, planned_steps=steps, delta=1e-5, budget=budget)
    assert budget - 0.01 < epsilon_of([Charge(sigma, q, steps)], 1e-5) <= budget


@pytest.mark.parametrize("steps", [10, 300])
def test_full_batch_steps_compose_to_one_release_at_sigma_over_root_t(steps: int) -> None:
    # T Gaussian releases at σ are one release at σ/√T, so calibration at q = 1 must find √T
    # times the one-release σ (0.5003 for ε = 10, δ = 1e-5). 300 steps once started at the
    # one-release σ, where PRV overflows, and never returned.
    one = calibrate_noise_multiplier([], sample_rate=1.0, planned_steps=1, delta=1e-5, budget=10.0)
    sigma = calibrate_noise_multiplier([], sample_rate=1.0, planned_steps=steps, delta=1e-5, budget=10.0)
    assert one == pytest.approx(0.5003, abs=1e-3)
    assert sigma == pytest.approx(one * math.sqrt(steps), rel=2e-3)
    assert 10.0 - 0.01 < epsilon_of([Charge(sigma, 1.0, steps)], 1e-5) <= 10.0


def test_calibration_accounts_for_what_was_already_spent() -> None:
    spent = [Charge(1.0, 0.1, 50)]
    sigma = calibrate_noise_multiplier(spent, sample_rate=0.1, planned_steps=50, delta=1e-5, budget=8.0)
    assert epsilon_of([*spent, Charge(sigma, 0.1, 50)], 1e-5) <= 8.0
    assert sigma > calibrate_noise_multiplier([], sample_rate=0.1, planned_steps=50, delta=1e-5, budget=8.0)


def test_budget_check_refuses_the_round_that_would_exceed() -> None:
    history = [Charge(1.0, 0.1, 100)]
    spent = epsilon_of(history, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        check_budget(history, Charge(1.0, 0.1, 100), delta=1e-5, budget=spent + 0.01, accountant="prv")
    assert info.value.spent == pytest.approx(spent)
    assert info.value.would_be > info.value.budget


def test_calibration_impossible_when_budget_already_spent() -> None:
    history = [Charge(0.5, 0.2, 200)]
    with pytest.raises(PrivacyBudgetExceeded):
        calibrate_noise_multiplier(history, sample_rate=0.2, planned_steps=10, delta=1e-5, budget=1.0)


def test_a_run_that_ended_at_its_budget_is_refused_the_next_round_not_crashed() -> None:
    # prepare: a release, then a run calibrated to end inside the band just below ε = 10
    release = Charge(0.6, 1.0, 1)
    sigma = calibrate_noise_multiplier([release], sample_rate=0.3, planned_steps=2, delta=1e-5, budget=10.0)
    history = [release, Charge(sigma, 0.3, 2)]
    spent = epsilon_of(history, 1e-5)
    # act: one round more, at another q (before: 100 accountant calls, then ArithmeticError)
    try:
        outcome: float | PrivacyBudgetExceeded = calibrate_noise_multiplier(
            history, sample_rate=0.5, planned_steps=2, delta=1e-5, budget=10.0)
    except PrivacyBudgetExceeded as exc:
        outcome = exc
    # assert: refused as spent, or only the largest σ, whose ε still fits
    assert 9.99 < spent <= 10.0
    if isinstance(outcome, PrivacyBudgetExceeded):
        assert outcome.spent == pytest.approx(spent) and outcome.would_be > 10.0
    else:
        assert outcome == 500.0 and epsilon_of([*history, Charge(outcome, 0.5, 2)], 1e-5) <= 10.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_ledger_with_a_round_at_a_huge_sigma_is_accounted_without_opacus_warnings(accountant: str) -> None:
    # prepare: what the hospitals held after training on noise (σ = 192), and a release at σ = 12
    history = [Charge(0.5, 0.15, 3), Charge(192.0, 0.15, 3), Charge(12.0, 1.0, 1)]
    # act: every prefix, as `medsynth node privacy` prints them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Optimal order is the largest alpha" would fail here
        eps = [epsilon_of(history[:k], 1e-5, accountant) for k in (1, 2, 3)]
        alone = epsilon_of(history[1:2], 1e-5, accountant)
    # assert: finite, and the σ = 192 round alone is at most Opacus's bound at its largest usable order
    assert all(math.isfinite(e) for e in eps)
    if accountant == "rdp":
        rdp = opacus_rdp.compute_rdp(q=0.15, noise_multiplier=192.0, steps=3, orders=BASE_ORDERS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loose bound at order 1024 is what is compared with
            loose, _ = opacus_rdp.get_privacy_spent(orders=BASE_ORDERS, rdp=rdp, delta=1e-5)
        assert alone < loose


@pytest.mark.parametrize(("q", "sigma"), [(0.15, 1.3), (0.15, 192.0), (0.01, 5.0), (0.5, 20.0)])
def test_the_stable_rdp_sum_is_opacus_own_where_opacus_is_finite(q: float, sigma: float) -> None:
    # prepare: Opacus's original integer-order sum (the module keeps it under its own name)
    from common.dp.accounting import _opacus_log_a_int

    for alpha in (2, 17, 400, 1024):
        # act / assert: the same value up to rounding
        assert log_a_int_stable(q, sigma, alpha) == pytest.approx(_opacus_log_a_int(q, sigma, alpha), rel=1e-9)
    # above 1024 Opacus's sum is NaN; the stable one is finite, RDP grows with the order and stays
    # below the un-subsampled Gaussian's α/2σ²; and Opacus now calls it (a rename upstream fails here)
    rdp = [opacus_rdp._compute_rdp(q, sigma, a) for a in (1024, 2048, 4096, 65536)]
    assert all(np.isfinite(rdp)) and rdp == sorted(rdp)
    assert all(r <= a / (2 * sigma**2) for r, a in zip(rdp, (1024, 2048, 4096, 65536), strict=True))
