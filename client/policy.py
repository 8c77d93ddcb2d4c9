"""The hospital decides: what a run may ask of this hospital, checked before anything happens.

A server proposes a run (its ``[tool.flwr.app.config]``); the hospital's own settings
(``SiteConfig``, from its ``node.toml``) decide. Every check here runs before the ledger is
touched, before any data is read for training, and before any key is advertised:

* differential privacy itself: a run without it (``dp.enabled = false``, the non-private
  reference of ``medsynth simulate --no-dp``) is refused by every hospital that is not a virtual
  one of a simulation;
* privacy parameters: the run's δ and accountant must be the hospital's own (a run that meets
  "ε = 10" at δ = 0.5 is ε ≈ 42 at δ = 1e-5); the ε budget is always the hospital's;
* classes: the run's class names must be the hospital's label configuration, in its order (the
  server must not choose which of the hospital's folders train);
* secure-aggregation graph: a run whose ``secagg.degree`` could give this hospital fewer
  neighbours than its ``[consortium] min-neighbours`` accepts (by default: any sparse graph) is
  refused (``check_secagg_graph``); the protocol checks the session's actual graph again;
* noise: a training round whose σ (calibrated to what is left of the budget, or the run's fixed
  σ) exceeds the hospital's ``max-noise-multiplier`` is refused (``check_noise_multiplier``):
  training on noise would spend budget for nothing, so it is not done silently;
* the received global model: the names and shapes of the run's model, finite, and within
  ``MODEL_VALUE_BOUND`` (a crafted parameter such as a discriminator bias of −1e10 is refused
  before any training or charge).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.config import ConfigError, RunConfig, SiteConfig
from common.errors import UserError
from common.secagg import COMPLETE

#: Largest |value| accepted in a received global model. Trained DCGAN weights and GroupNorm
#: affine parameters stay within a few units; 1e3 leaves ample room and refuses a crafted
#: parameter meant to push a loss or an update out of its quantisation bound.
MODEL_VALUE_BOUND = 1e3


class RunRefused(ConfigError):
    """The run asks this hospital for something its own settings do not allow; nothing was charged or sent."""


class NoiseRefused(RunRefused):
    """The run would train at a σ above this hospital's ``max-noise-multiplier``; nothing was charged."""


class ModelRefused(UserError, ValueError):
    """The received global model is not the run's model, or holds a non-finite or out-of-range value."""


def check_run_allowed(run: RunConfig, site: SiteConfig) -> None:
    """``RunRefused`` unless the run is differentially private and its privacy parameters and
    classes are the hospital's own."""
    if not run.privacy.enabled and not site.simulated:
        raise RunRefused(
            "the run asks to train without differential privacy (dp.enabled = false); a hospital always "
            "trains with DP: only the virtual hospitals of `medsynth simulate --no-dp` accept that"
        )
    if run.privacy.delta != site.delta:
        raise RunRefused(
            f"the run asks for δ = {run.privacy.delta:g}, this hospital accounts at δ = {site.delta:g} "
            "([node] delta in node.toml); ask the consortium to run at the hospitals' δ"
        )
    if run.privacy.accountant != site.accountant:
        raise RunRefused(
            f"the run asks for the {run.privacy.accountant} accountant, this hospital uses {site.accountant} "
            "([node] accountant in node.toml)"
        )
    check_secagg_graph(run, site)
    if run.class_names != site.class_names:
        raise RunRefused(
            f"the run trains classes {list(run.class_names)}, this hospital's label configuration is "
            f"{list(site.class_names)} ([prepare] class-names in node.toml); the server does not choose them"
        )


def check_secagg_graph(run: RunConfig, site: SiteConfig) -> None:
    """``RunRefused`` when the run's ``secagg.degree`` is sparser than this hospital accepts.

    The session's participants are among the hospital's pinned members, so a degree of at least
    members − 1 always gives the complete graph (Bell et al., CCS 2020 with k = n − 1, i.e.
    Bonawitz et al.) and is accepted; a smaller one needs the hospital's opt-in
    (``min-neighbours`` > 0) and must not be below it. Checked before anything is charged or sent.
    """
    degree = run.federation.secagg_degree
    degree += degree % 2  # an odd degree is rounded up (common.secagg.graph.effective_degree)
    if not run.federation.secure_aggregation or degree == COMPLETE or degree >= len(site.members) - 1:
        return
    if site.min_neighbours == COMPLETE:
        raise RunRefused(
            f"the run asks for secure aggregation on a sparse graph (secagg.degree = {degree}: each hospital masks "
            f"with {degree} others, not all {len(site.members) - 1}); this hospital accepts only the complete graph. "
            "Nothing was charged. Opt in with [consortium] min-neighbours in node.toml if your privacy officer "
            "agrees (docs/privacy.md says what a sparse graph does not protect against)"
        )
    if degree < site.min_neighbours:
        raise RunRefused(
            f"the run asks for secagg.degree = {degree} neighbours per hospital, fewer than this hospital's "
            f"[consortium] min-neighbours = {site.min_neighbours}; nothing was charged"
        )


def check_noise_multiplier(sigma: float, site: SiteConfig, *, calibrated: bool) -> None:
    """``NoiseRefused`` when a training round's σ exceeds the hospital's ``max-noise-multiplier``.

    Checked before the ledger is charged and before the plan is kept, so a refused run costs
    nothing and a raised cap takes effect at the next request.
    """
    if sigma <= site.max_noise_multiplier:
        return
    why = ("calibrated to what is left of this run's ε (the budget, or max-epsilon-per-run)" if calibrated
           else "the run's fixed dp.noise-multiplier")
    raise NoiseRefused(
        f"the run would train at σ = {sigma:.3g} ({why}), above this hospital's max-noise-multiplier = "
        f"{site.max_noise_multiplier:g}: at such σ the update is mostly noise, so this hospital does not train "
        "(nothing was charged). Ask for fewer rounds or local steps, or raise [node] max-noise-multiplier or "
        "the budget in node.toml if your privacy officer agrees"
    )


def check_global_model(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """``ModelRefused`` unless ``arrays`` has exactly the expected names and shapes, and every
    floating-point value is finite with |value| ≤ ``MODEL_VALUE_BOUND``."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ModelRefused(f"the global model's tensors differ from the run's model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    for name, shape in expected.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(shape):
            raise ModelRefused(f"global model tensor {name} has shape {value.shape}, the run's model {shape}")
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if not np.all(np.isfinite(value)):
            raise ModelRefused(f"global model tensor {name} holds a non-finite value")
        if value.size and float(np.max(np.abs(value))) > MODEL_VALUE_BOUND:
            raise ModelRefused(f"global model tensor {name} holds a value beyond ±{MODEL_VALUE_BOUND:g}")


def check_warm_start(vector: np.ndarray | None, size: int) -> np.ndarray:
    """``ModelRefused`` unless a run with a warm start sent its summed release: (size,), finite.

    The sum is the server's to send (it is DP output of every hospital's round 0); a crafted one
    can only steer G, whose steps are post-processing, never what this hospital's data reveals.
    """
    if vector is None:
        raise ModelRefused("the run has a warm start but the train request carries no warm-start sum")
    if vector.shape != (size,) or not np.all(np.isfinite(vector)):
        raise ModelRefused(f"the warm-start sum must be {size} finite values, got shape {vector.shape}")
    return vector
