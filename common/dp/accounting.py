"""Privacy accounting: accountant history → epsilon, noise calibration, budget checks.

The mechanism is the Poisson-subsampled Gaussian of DP-SGD (Abadi et al., CCS 2016): each D step
samples every *patient* independently with probability q, clips each per-sample gradient to norm C
and adds N(0, σ²C²). A history is the list of (σ, q, steps) triples of every step ever taken by a
hospital, across rounds and runs; epsilon is a function of that whole history, never of one
round (re-creating the accountant per round under-reports, e.g. 1.54 vs 5.14 in FIELD_NOTES).

Accountants (Opacus 1.6):
* ``prv``: privacy-loss random variables (Gopi, Lee, Wutschitz, NeurIPS 2021), an upper bound
  on epsilon with ``eps_error`` 0.01 (Opacus's default, returned as the bound's upper end);
* ``rdp``: Rényi DP (Mironov, CSF 2017) converted to (ε, δ), looser but classic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from common.errors import UserError


class PrivacyBudgetExceeded(UserError):
    """Training would take a hospital past its epsilon budget; nothing was trained or sent."""

    def __init__(self, spent: float, would_be: float, budget: float) -> None:
        super().__init__(
            f"privacy budget exhausted: spent ε={spent:.4f}, this round would make it "
            f"ε={would_be:.4f} > budget {budget:.4f}; this hospital does not train further "
            "(raise the budget only if your privacy officer agrees)"
        )
        self.spent = spent
        self.would_be = would_be
        self.budget = budget


@dataclass(frozen=True)
class Charge:
    """``steps`` DP-SGD steps at noise multiplier σ and patient sample rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant by mechanism name (``prv`` or ``rdp``)."""
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}: use 'prv' or 'rdp'")


def epsilon_of(history: Sequence[Charge], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of the composition of every charge in ``history`` (0 when empty).

    The Opacus accountant's own state is exactly such a list of (σ, q, steps) triples, so we
    hand it the history and let it compose (heterogeneous composition for PRV). Charges with
    the same (σ, q) are merged first: composition is commutative, so k steps here and m steps
    there at the same (σ, q) are exactly k + m steps, and the PRV accountant's cost grows with
    the number of distinct entries.
    """
    merged: dict[tuple[float, float], int] = {}
    for c in history:
        if c.steps > 0:
            key = (c.noise_multiplier, c.sample_rate)
            merged[key] = merged.get(key, 0) + c.steps
    entries = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    if not entries:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = entries
    eps = float(acc.get_epsilon(delta=delta))
    if math.isnan(eps):
        raise ArithmeticError(f"accountant returned NaN for history {entries}")
    return eps


def calibrate_noise_multiplier(
    history: Sequence[Charge],
    *,
    sample_rate: float,
    planned_steps: int,
    delta: float,
    budget: float,
    accountant: str = "prv",
    tolerance: float = 0.01,
    sigma_max: float = 500.0,
) -> float:
    """Smallest σ (within ``tolerance`` in ε) such that history + planned steps end at ≤ budget.

    Bisection on σ, using that ε is decreasing in σ. The returned σ always satisfies the
    budget (the upper end of the bracket is returned), so "end at, never above" holds by
    construction. Raises ``PrivacyBudgetExceeded`` when even ``sigma_max`` cannot fit.
    """
    if planned_steps < 1:
        raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
    spent = epsilon_of(history, delta, accountant)

    def eps_at(sigma: float) -> float:
        return epsilon_of([*history, Charge(sigma, sample_rate, planned_steps)], delta, accountant)

    hi = 1.0
    while eps_at(hi) > budget:
        hi *= 2.0
        if hi > sigma_max:
            raise PrivacyBudgetExceeded(spent, eps_at(sigma_max), budget)
    lo = 0.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        eps_mid = eps_at(mid)
        if eps_mid > budget:
            lo = mid
        else:
            hi = mid
            if budget - eps_mid < tolerance:
                break
    return hi


def check_budget(
    history: Sequence[Charge], charge: Charge, *, delta: float, budget: float, accountant: str
) -> float:
    """ε after ``charge``; raises ``PrivacyBudgetExceeded`` if it would exceed ``budget``."""
    would_be = epsilon_of([*history, charge], delta, accountant)
    if would_be > budget:
        raise PrivacyBudgetExceeded(epsilon_of(history, delta, accountant), would_be, budget)
    return would_be
