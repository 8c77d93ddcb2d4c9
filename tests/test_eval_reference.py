"""Reference data for the evaluation: the same pixels the hospitals train on, split without leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.prepare.pipeline import prepare_site
from common.dataset import LocalDataset, save_cache
from common.evaluation.reference import ReferenceDataError, load_reference, to_model_range, unit_per_image
from simulation.partition import SourceData, write_site_dicom


def test_medmnist_pixels_match_what_prepare_makes_of_the_simulated_dicom(tmp_path: Path) -> None:
    # prepare: 12 MedMNIST-shaped images (28×28 uint8, different ranges), written and prepared as a hospital would
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(lo, lo + 120, (28, 28)) for lo in range(0, 120, 10)]).astype(np.uint8)
    source = SourceData(images=images, labels=np.arange(12, dtype=np.int64) % 2, patient_ids=None,
                        class_names=("normal", "pneumonia"))
    write_site_dicom(source, np.arange(12), tmp_path / "dicom", site_name="s", seed=0)
    prepare_site(tmp_path / "dicom", tmp_path / "cache", image_size=32, salt=b"s" * 32,
                 class_names=source.class_names)
    prepared = np.load(tmp_path / "cache" / "dataset.npz")["images"]
    # act
    ours = to_model_range(unit_per_image(images), 32)
    # assert: every prepared image is one of ours, exactly (file order may differ)
    dist = ((prepared.reshape(12, 1, -1) - ours.reshape(1, 12, -1)) ** 2).sum(-1)
    assert dist.min(axis=1).max() < 1e-10
    assert sorted(dist.argmin(axis=1).tolist()) == list(range(12))


def test_a_prepared_cache_is_split_by_patient_and_takes_a_held_out_folder(tmp_path: Path) -> None:
    # prepare: 30 patients × 3 images; a second cache as held-out data
    def cache(folder: Path, patients: int, seed: int) -> Path:
        rng = np.random.default_rng(seed)
        pid = np.repeat(np.arange(patients), 3)
        ds = LocalDataset(images=rng.uniform(-1, 1, (pid.size, 1, 32, 32)).astype(np.float32),
                          labels=(pid % 2).astype(np.int64), patients=pid.astype(np.int64),
                          class_names=("normal", "lesion"), patient_identity=True)
        save_cache(ds, folder, "fp", np.array([f"h{i}" for i in range(patients)]))
        return folder

    main, held = cache(tmp_path / "main", 30, 0), cache(tmp_path / "held", 10, 1)
    # act
    ref = load_reference(main, 32, held_out=held)
    ref64 = load_reference(main, 64)
    # assert: 6 of 30 patients (20 %) are test, and no image is in both splits
    assert (len(ref.train), len(ref.test), len(ref.held_out or [])) == (72, 18, 30)
    train_rows = {r.tobytes() for r in ref.train.images}
    assert not any(r.tobytes() in train_rows for r in ref.test.images)
    assert ref.class_names == ("normal", "lesion") and len(ref.sha256) == 64
    assert ref64.image_size == 64 and ref64.held_out is None


def test_unusable_references_are_refused_with_a_hint(tmp_path: Path) -> None:
    # act / assert
    with pytest.raises(ReferenceDataError, match="medsynth node prepare"):
        load_reference(tmp_path, 32)  # a folder, but not a prepared cache
    with pytest.raises(ReferenceDataError, match="not found"):
        load_reference(tmp_path / "missing.npz", 32)
    np.savez(tmp_path / "odd.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ReferenceDataError, match="train_images"):
        load_reference(tmp_path / "odd.npz", 32)
