"""What a run spends at one hospital: its ε target, the warm-start release's σ, the training σ.

One place for the arithmetic a hospital does before it touches its data (``client.task``) and
that anyone can redo from public values (``medsynth server start`` prints it for a hospital with a
fresh budget; ``medsynth node status`` for this hospital's ledger):

* the run's **target**: a run ends at, never above, ``min(budget, before + max_epsilon_per_run)``,
  where ``before`` is ε of every charge of other runs (:func:`run_target`). ``max-epsilon-per-run``
  is the hospital's cap on what one run may add (``node.toml``); by default the whole budget.
  Composition is not additive, so "what a run adds" is ε(everything) − ε(everything but the run);
* the warm-start **release** (round 0) takes ``share`` of what is left of the target
  (:func:`release_noise_multiplier`);
* the **training** rounds are calibrated on top of the whole ledger so that the run's remaining
  rounds end at the target (:func:`training_noise_multiplier`), or use the run's fixed σ.

Every input is public or the hospital's own setting: the run config (rounds, local steps, the
public sample rate q, the warm-start share), δ, the accountant, the budget and the cap, and the
ledger's history, whose entries are themselves (σ, q, steps) triples computed the same way. No
patient count enters, so σ may leave the hospital with its ε (``common.protocol.messages``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.config import RunConfig
from common.dp.accounting import Charge, PrivacyBudgetExceeded, calibrate_noise_multiplier, epsilon_of


def run_target(before: float, *, budget: float, max_epsilon_per_run: float) -> float:
    """ε at which a run that starts from ``before`` must end: the budget, or ``before`` + the per-run cap."""
    return min(budget, before + max_epsilon_per_run)


def release_noise_multiplier(history: Sequence[Charge], *, budget: float, share: float, delta: float,
                             accountant: str) -> float:
    """σ of the warm-start release: it takes ε from what is spent to spent + ``share`` × (budget − spent).

    ``budget`` is the run's target (:func:`run_target`). On a fresh ledger that is ``share`` of the
    budget; a hospital that already spent some of it in earlier runs gives the release the same
    share of what is left. The DP-SGD rounds are then calibrated on top of the ledger, release
    included, so the run still ends at, never above, the target. ``PrivacyBudgetExceeded`` when
    nothing is left.
    """
    spent = epsilon_of(history, delta, accountant) if history else 0.0
    if spent >= budget:
        raise PrivacyBudgetExceeded(spent, spent, budget)
    return calibrate_noise_multiplier(history, sample_rate=1.0, planned_steps=1, delta=delta,
                                      budget=spent + share * (budget - spent), accountant=accountant)


def training_noise_multiplier(history: Sequence[Charge], run: RunConfig, *, server_round: int, target: float,
                              delta: float, accountant: str) -> float:
    """σ of the training rounds from ``server_round`` to the run's last: the run's fixed σ, or
    (``dp.calibrate``) the smallest σ whose rounds end at ≤ ``target`` on top of ``history``.
    ``PrivacyBudgetExceeded`` when even the largest σ cannot fit."""
    if not run.privacy.calibrate:
        return run.privacy.noise_multiplier
    remaining = max(run.federation.num_rounds - server_round + 1, 1)
    return calibrate_noise_multiplier(history, sample_rate=run.privacy.sample_rate,
                                      planned_steps=remaining * run.train.local_steps, delta=delta,
                                      budget=target, accountant=accountant)


@dataclass(frozen=True)
class RunPlan:
    """What a whole run would spend at one hospital, from its first round to its last."""

    epsilon_before: float  # ε of the ledger before the run
    epsilon_target: float  # the run ends at, never above, this ε
    release_sigma: float | None  # σ of the warm-start release (None: the run has none)
    sigma: float  # σ of every training round
    steps: int  # DP-SGD steps of the training rounds
    epsilon_after: float  # ε after every round of the run (above the target only with a fixed σ)

    def describe(self) -> str:
        """One line: σ, and ε before → after (of the target)."""
        release = "" if self.release_sigma is None else f"warm-start release at σ = {self.release_sigma:.3g}, then "
        return (f"{release}{self.steps} training steps at σ = {self.sigma:.3g}: ε {self.epsilon_before:.2f} → "
                f"{self.epsilon_after:.2f} (this run may reach {self.epsilon_target:.2f})")


def plan_run(run: RunConfig, *, budget: float, delta: float, accountant: str, history: Sequence[Charge] = (),
             max_epsilon_per_run: float = math.inf) -> RunPlan:
    """The σ and ε a run would use at a hospital with ``history`` in its ledger (by default a fresh one).

    The same functions the hospital calls round by round (``client.task``), applied to the whole
    run at once; ``PrivacyBudgetExceeded`` when the hospital could not take part at all.
    """
    before = epsilon_of(history, delta, accountant) if history else 0.0
    target = run_target(before, budget=budget, max_epsilon_per_run=max_epsilon_per_run)
    done = list(history)
    release_sigma = None
    if run.warm_start.enabled:
        release_sigma = release_noise_multiplier(done, budget=target, share=run.warm_start.budget_share,
                                                 delta=delta, accountant=accountant)
        done.append(Charge(release_sigma, 1.0, 1))
    sigma = training_noise_multiplier(done, run, server_round=1, target=target, delta=delta, accountant=accountant)
    steps = run.federation.num_rounds * run.train.local_steps
    after = epsilon_of([*done, Charge(sigma, run.privacy.sample_rate, steps)], delta, accountant)
    return RunPlan(epsilon_before=before, epsilon_target=target, release_sigma=release_sigma, sigma=sigma,
                   steps=steps, epsilon_after=after)


def fresh_hospital_line(run: RunConfig) -> str:
    """What ``medsynth server start`` prints before the run: the σ a hospital with a fresh budget of
    ``dp.epsilon-budget`` (at the run's δ and accountant, no per-run cap) would train at."""
    p = run.privacy
    if not p.enabled:
        return ("planned run: WITHOUT differential privacy (dp.enabled = false): every deployed hospital refuses it; "
                "only the virtual hospitals of `medsynth simulate --no-dp` train it")
    try:
        plan = plan_run(run, budget=p.epsilon_budget, delta=p.delta, accountant=p.accountant)
    except PrivacyBudgetExceeded:
        return (f"planned run: a hospital with a fresh budget of ε = {p.epsilon_budget:g} could not take part "
                "(even the largest σ would exceed it); lower the rounds or local steps")
    return (f"planned run: each hospital with a fresh budget of ε = {p.epsilon_budget:g} (δ = {p.delta:g}, "
            f"{p.accountant}) would do {plan.describe()}; a hospital that spent part of its budget trains at a "
            "larger σ, and one whose max-noise-multiplier is below it refuses")
