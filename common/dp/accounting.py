"""Privacy accounting: accountant history → epsilon, noise calibration, budget checks.

The mechanism is the Poisson-subsampled Gaussian of DP-SGD (Abadi et al., CCS 2016): each D step
samples every *patient* independently with probability q, clips each per-sample gradient to norm C
and adds N(0, σ²C²). A history is the list of (σ, q, steps) triples of every step ever taken by a
hospital, across rounds and runs; epsilon is a function of that whole history, never of one
round (re-creating the accountant per round under-reports: N=1000, B=32, σ=1, 20 rounds, δ=1e-5
gives ε ≈ 1.54 per round but ≈ 5.14 cumulative under PRV; ``tests/test_privacy.py`` checks both).

Accountants (Opacus 1.6):
* ``prv``: privacy-loss random variables (Gopi, Lee, Wutschitz, NeurIPS 2021), an upper bound
  on epsilon with ``eps_error`` 0.01 (Opacus's default, returned as the bound's upper end);
* ``rdp``: Rényi DP (Mironov, CSF 2017) converted to (ε, δ), looser but classic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import gammaln, logsumexp

from common.errors import UserError

# RDP orders: Opacus's defaults stop at 63, and the optimal order of one step at large σ and
# tiny δ lies beyond (one Gaussian release at σ = 17 and the δ/(8T) that PRV's domain bound uses
# wants ≈ 100–300). Opacus then warns and returns the bound at 63: valid but loose. Opacus's PRV
# accountant sizes its truncation domain with a fresh ``RDPAccountant()``, so the orders are set
# on the class: more orders only ever tighten an RDP bound (the minimum over a superset).
BASE_ORDERS: list[float] = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256, 8), *range(256, 1025, 64)]
RDPAccountant.DEFAULT_ALPHAS = BASE_ORDERS

# Beyond order 1024 Opacus's subsampled-Gaussian RDP is NaN: its integer-order sum takes
# log(scipy.special.binom(α, i)), and the binomial overflows a float from α ≈ 1030. A history
# with a large σ/q (σ = 192 at q = 0.15: its optimal order at PRV's δ is ≈ 10⁴) then gets the
# bound at 1024 — valid but loose — and Opacus warns on every ε computed from it. Above 1024 the
# same sum is computed here in log space (log-binomials by lgamma), and such histories get the
# higher orders they need (:func:`orders_for`); at 1024 and below Opacus's own code runs.
OPACUS_MAX_INT_ORDER = 1024
MAX_ORDER = 2**20  # a sum of 10⁶ terms (8 MB); a σ/q needing more keeps the (valid, loose) bound there
_opacus_log_a_int = opacus_rdp._compute_log_a_for_int_alpha


def log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α of the Poisson-subsampled Gaussian at integer order α: Opacus's own code up to
    :data:`OPACUS_MAX_INT_ORDER`, :func:`log_a_int_stable` above."""
    if alpha <= OPACUS_MAX_INT_ORDER:
        return float(_opacus_log_a_int(q, sigma, alpha))
    return log_a_int_stable(q, sigma, alpha)


def log_a_int_stable(q: float, sigma: float, alpha: int) -> float:
    """log Σ_i C(α, i) q^i (1 − q)^(α−i) exp((i² − i) / 2σ²) (Mironov et al. 2019, §3.3; Opacus's
    formula) with every term in log space, so no binomial overflows."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1.0) - gammaln(i + 1.0) - gammaln(alpha - i + 1.0)
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return float(logsumexp(terms))


opacus_rdp._compute_log_a_for_int_alpha = log_a_int  # tests/test_privacy.py fails if Opacus renames it


def orders_for(entries: Sequence[tuple[float, float, int]], delta: float) -> list[float]:
    """The RDP orders for a history of (σ, q, steps): :data:`BASE_ORDERS`, and doubling orders up
    to twice the largest optimal order any entry can have (none for usual histories).

    For one step of the subsampled Gaussian RDP(α) ≈ q²α / 2σ² (α/2σ² at q = 1), so ε(α) ≈
    RDP(α) + log(1/δ)/(α − 1) is least near α = (σ/q)·√(2 log(1/δ)); composition only lowers it.
    The smallest δ asked of the RDP accountant is PRV's domain bound, δ / (8000 · total steps).
    """
    total = sum(n for _, _, n in entries)
    log_inv_delta = math.log(8000 * max(total, 1) / delta)
    top = max((s / q) * math.sqrt(2 * log_inv_delta) for s, q, _ in entries)
    extra: list[float] = []
    order = 2 * OPACUS_MAX_INT_ORDER
    while order < 4 * top and order <= MAX_ORDER:  # the optimum then lies below the last order
        extra.append(order)
        order *= 2
    return [*BASE_ORDERS, *extra]


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
    the number of distinct entries. The merged entries are put in a fixed (sorted) order, so
    one history always gives the same float.
    """
    merged: dict[tuple[float, float], int] = {}
    for c in history:
        if c.steps > 0:
            key = (c.noise_multiplier, c.sample_rate)
            merged[key] = merged.get(key, 0) + c.steps
    if not merged:
        return 0.0
    return _epsilon_of_entries(tuple(sorted((s, q, n) for (s, q), n in merged.items())), delta, accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_of_entries(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of merged (σ, q, steps) entries: a pure function of its arguments, so it is cached — a
    round's budget check asks again for the ε the calibration already computed, and most of a
    PRV call is Opacus's RDP bound on the domain (≈ 1–4 s on one core)."""
    acc = make_accountant(accountant)
    acc.history = list(entries)
    # A step at q = 1 (the warm-start release: the plain Gaussian mechanism) makes Opacus's PRV
    # evaluate log(1 − q) = log 0 = −inf, which is the right value there (its test t > log(1 − q)
    # then holds for every t); numpy's divide warning for it says nothing about the result.
    RDPAccountant.DEFAULT_ALPHAS = orders_for(entries, delta)  # read by RDP and by PRV's domain bound
    try:
        with np.errstate(divide="ignore" if any(q == 1.0 for _, q, _ in entries) else "warn"):
            eps = float(acc.get_epsilon(delta=delta))
    finally:
        RDPAccountant.DEFAULT_ALPHAS = BASE_ORDERS
    if math.isnan(eps):
        raise ArithmeticError(f"accountant returned NaN for history {list(entries)}")
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

    ε is decreasing in σ, and close to a power law (ε ∝ σ^-a, a ≈ 1 for large σ), so the root of
    log ε(σ) = log budget is found by regula falsi in (log σ, log ε) rather than by bisection: a
    handful of accountant calls instead of a dozen, and none at the tiny σ where the PRV
    accountant is slowest (8 s at σ = 0.3 against 0.3 s at σ = 4 on one core). For ``prv`` the
    start is the ``rdp`` answer, which is cheap and an upper bound on the PRV σ (RDP's ε is the
    looser one). The returned σ is always one whose ε was computed and found ≤ budget, so "end
    at, never above" holds by construction. Raises ``PrivacyBudgetExceeded`` when even
    ``sigma_max`` cannot fit.
    """
    if planned_steps < 1:
        raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")

    def eps_at(sigma: float, name: str) -> float:
        return epsilon_of([*history, Charge(sigma, sample_rate, planned_steps)], delta, name)

    spent = epsilon_of(history, delta, accountant) if history else 0.0
    if history and budget - spent < tolerance:
        # less than the tolerance is left: there is no band to aim into, and the solver's steps
        # would drown in the accountant's own error. The largest σ fits (and the hospital's
        # max-noise-multiplier then refuses it), or nothing does.
        at_max = eps_at(sigma_max, accountant)
        if at_max > budget:
            raise PrivacyBudgetExceeded(spent, at_max, budget)
        return sigma_max
    start, slope = 1.0, -1.0
    if sample_rate == 1.0:
        # the plain Gaussian mechanism (a warm-start release): start from the classical bound
        # σ = √(2 ln(1.25/δ)) / ε (Dwork & Roth 2014, Thm. 3.22), not from RDP, whose default
        # orders are too few for one release at small ε (Opacus warns and the start is poor).
        # T releases at σ each compose to exactly one release at σ/√T (their sum of squared
        # means over the summed variances), so T of them need √T times the one-release σ.
        start = max(math.sqrt(planned_steps * 2 * math.log(1.25 / delta)) / budget, 0.05)
    elif accountant == "prv":
        # σ ≤ 32 here: the start hardly matters above it
        top = min(sigma_max, 32.0)
        try:
            start, slope = _solve_sigma(lambda s: eps_at(s, "rdp"), budget, 1.0, -1.0, top, 0.05 * budget, None)
        except PrivacyBudgetExceeded:  # RDP is the looser bound: PRV may still fit (what is spent was checked above)
            start = top
    sigma, _ = _solve_sigma(
        lambda s: eps_at(s, accountant), budget, start, slope, sigma_max, tolerance, history_eps=lambda: spent,
    )
    return sigma


def _solve_sigma(
    eps: Callable[[float], float],
    budget: float,
    start: float,
    slope: float,
    sigma_max: float,
    tolerance: float,
    history_eps: Callable[[], float] | None,
) -> tuple[float, float]:
    """The σ ≤ ``sigma_max`` with ``budget − tolerance < eps(σ) ≤ budget`` (or σ within 0.1 %),
    and the last secant slope of log ε against log σ (a start for a finer solve).

    Works on f(x) = log eps(e^x) − log budget, decreasing in x = log σ. Until the root is
    bracketed it steps with the secant slope (``slope`` before two points exist), at most ×4 in σ per
    step; once bracketed, Illinois regula falsi (the retained end's weight halved when the same
    end moves twice; the tolerance test always uses the true ε) keeps the bracket and converges superlinearly.
    """
    log_budget = math.log(budget)
    # Unbracketed steps aim at the middle of the accepted band (budget − tolerance/2), not at the
    # budget itself: aimed at f = 0, secant steps from above can creep towards the root without
    # ever landing at or below it (seen: ε 0.8, q 0.11, 500 steps stalled at ε = 0.80001).
    f_aim = math.log1p(-min(tolerance / (2 * budget), 0.5))

    def f(x: float) -> float:
        return math.log(eps(math.exp(x))) - log_budget

    x_max = math.log(sigma_max)
    lo: tuple[float, float] | None = None  # (x, f) with f > 0: ε above the budget
    hi: tuple[float, float] | None = None  # (x, f) with f <= 0: within the budget
    w_lo = w_hi = 1.0  # Illinois weights on the ends' f in the interpolation only (true f kept above)
    x = math.log(min(start, sigma_max))
    prev: tuple[float, float] | None = None  # the previous point, for the secant slope
    side = 0  # which end moved last: -1 lo, +1 hi
    for _ in range(100):
        fx = f(x)
        if not math.isfinite(fx):
            # the accountant overflowed (a σ far too small for this many steps: PRV's domain
            # explodes): certainly above the budget, and no secant can be drawn through it
            if x >= x_max:
                raise ArithmeticError(f"the accountant returned ε = {math.exp(fx + log_budget)} at σ = {sigma_max}")
            lo, side, w_lo = (x, math.inf), -1, 1.0
            x = min(x + math.log(4.0), x_max) if hi is None else (x + hi[0]) / 2
            continue
        if fx > 0:
            lo, moved, w_lo = (x, fx), -1, 1.0
        else:
            hi, moved, w_hi = (x, fx), 1, 1.0
        if prev is not None and prev[0] != x:
            slope = min((fx - prev[1]) / (x - prev[0]), -0.25)  # ε decreases in σ: never flat or rising
        prev = (x, fx)
        if hi is not None and (budget - budget * math.exp(hi[1]) < tolerance):
            return math.exp(hi[0]), slope
        if lo is not None and hi is not None:
            if hi[0] - lo[0] < 1e-3:
                return math.exp(hi[0]), slope
            if moved == side == 1:
                w_lo /= 2
            elif moved == side == -1:
                w_hi /= 2
            side = moved
            f_lo, f_hi = w_lo * lo[1], w_hi * hi[1]
            # an overflowed end has no value to interpolate with: halve the bracket instead
            x = lo[0] + (hi[0] - lo[0]) * (f_lo / (f_lo - f_hi) if math.isfinite(f_lo) else 0.5)
            # keep the step strictly inside the bracket
            x = min(max(x, lo[0] + 0.01 * (hi[0] - lo[0])), hi[0] - 0.01 * (hi[0] - lo[0]))
        else:
            step = max(min((f_aim - fx) / slope, math.log(4.0)), -math.log(4.0))
            if lo is not None and x >= x_max:
                spent = history_eps() if history_eps is not None else float("nan")
                raise PrivacyBudgetExceeded(spent, budget * math.exp(fx), budget)
            x = min(x + step, x_max)
    raise ArithmeticError(f"no noise multiplier found for ε budget {budget} within 100 accountant calls")


def check_budget(
    history: Sequence[Charge], charge: Charge, *, delta: float, budget: float, accountant: str
) -> float:
    """ε after ``charge``; raises ``PrivacyBudgetExceeded`` if it would exceed ``budget``."""
    would_be = epsilon_of([*history, charge], delta, accountant)
    if would_be > budget:
        raise PrivacyBudgetExceeded(epsilon_of(history, delta, accountant), would_be, budget)
    return would_be
