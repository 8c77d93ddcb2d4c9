"""Small builders shared by tests (no mocks of the code under test)."""

from __future__ import annotations

import numpy as np

from common.dataset import LocalDataset


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
    """``[tool.flwr.app.config]`` flattened as Flower does (``dp.delta``), plus overrides."""
    import tomllib
    from pathlib import Path

    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    flat: dict[str, object] = {}

    def walk(prefix: str, node: dict[str, object]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", raw["tool"]["flwr"]["app"]["config"])
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    return flat
