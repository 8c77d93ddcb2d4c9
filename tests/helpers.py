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
