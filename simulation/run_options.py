"""Which ``medsynth simulate`` option overrides which run-config key.

Kept apart from ``simulation.runner`` (which imports Flower, torch and pydicom through the
hospital's code) so that ``medsynth simulate --help`` can name each option's app default without
importing any of them.
"""

from __future__ import annotations

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
    "dp": "dp.enabled",
    "pairs": "model.pairs",
}
