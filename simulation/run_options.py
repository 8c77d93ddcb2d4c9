"""Which ``medsynth simulate`` option overrides which run-config key.

Kept apart from ``simulation.runner`` (which imports Flower, torch and pydicom through the
hospital's code) so that ``medsynth simulate --help`` can name each option's app default without
importing any of them.
"""

from __future__ import annotations

import math

RUN_OPTIONS: dict[str, str] = {
    # SimulateOptions field → the run config key it overrides (None: the app default)
    "rounds": "num-server-rounds",
    "epsilon": "dp.epsilon-budget",
    "delta": "dp.delta",
    "seed": "seed",
    "image_size": "model.image-size",
    "local_steps": "train.local-steps",
    "batch_size": "train.batch-size",
    "sample_rate": "dp.sample-rate",
    "d_steps_per_g": "train.d-steps-per-g",
    "device": "train.device",
    "secure_aggregation": "secure-aggregation",
    "warm_start_share": "warm-start.budget-share",
    "pretrain_steps": "warm-start.pretrain-steps",
    "dp": "dp.enabled",
    "pairs": "model.pairs",
    "secagg_degree": "secagg.degree",
}

#: ``--secagg-degree auto``: up to this many virtual hospitals the complete graph (a sparse one saves
#: little there, and Bonawitz et al.'s guarantees are the stronger ones; ``common.secagg.graph``)
AUTO_COMPLETE_UP_TO = 40
#: ``--secagg-degree auto`` above that: k = ceil(AUTO_C · log2 n), the O(log n) degree of Bell et al.,
#: CCS 2020 (c = 3: k = 20 at n = 100, 28 at n = 500; docs/privacy.md gives the failure bounds)
AUTO_C = 3.0


def auto_degree(sites: int) -> int:
    """The ``secagg.degree`` of ``--secagg-degree auto``: 0 (complete) for small n, else ceil(c·log2 n)."""
    if sites <= AUTO_COMPLETE_UP_TO:
        return 0
    return math.ceil(AUTO_C * math.log2(sites))


def secagg_degree_option(value: str | None, sites: int) -> int | None:
    """``--secagg-degree`` (simulate, bench_scale): None (the app default), an integer, or ``auto``."""
    if value is None:
        return None
    if value == "auto":
        return auto_degree(sites)
    try:
        return int(value)
    except ValueError:
        from common.config import ConfigError

        raise ConfigError(f"--secagg-degree {value!r}: an integer (0: the complete graph) or auto") from None
