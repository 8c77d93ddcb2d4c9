"""Small builders shared by tests (no mocks of the code under test)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from common.config import ModelConfig, TrainConfig
from common.dataset import LocalDataset

RUN_ID = 4242  # the run id tests give Flower's task identity and their messages


def set_task_identity(run_id: int = RUN_ID) -> None:
    """What Flower's ServerApp process sets before it builds a ``Message``."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1


def toy_dataset(num_patients: int = 40, per_patient: int = 3, size: int = 32, seed: int = 0) -> LocalDataset:
    """Random images in [-1, 1], two classes, ``per_patient`` images per patient."""
    rng = np.random.default_rng(seed)
    n = num_patients * per_patient
    patients = np.repeat(np.arange(num_patients), per_patient).astype(np.int64)
    labels = (patients % 2).astype(np.int64)
    images = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    return LocalDataset(
        images=images,
        labels=labels,
        patients=patients,
        class_names=("normal", "lesion"),
        patient_identity=True,
    )


def default_run_config(**overrides: object) -> dict[str, object]:
    """``[tool.flwr.app.config]`` flattened as Flower does (``dp.delta``), plus overrides
    (``dp__delta=...`` for ``dp.delta``); an unknown key or a wrong type is refused."""
    from common.config import run_config_values

    return dict(run_config_values({k.replace("__", "."): v for k, v in overrides.items()}))


def app_model(**fields: Any) -> ModelConfig:
    """The app's default model (``[tool.flwr.app.config]``) with ``fields`` changed."""
    from common.config import run_config

    return replace(run_config().model, **fields)


def app_train(**fields: Any) -> TrainConfig:
    """The app's default local training with ``fields`` changed."""
    from common.config import run_config

    return replace(run_config().train, **fields)
