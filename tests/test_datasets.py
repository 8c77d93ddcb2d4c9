"""simulation.datasets: the HC18 28×28 two-class MedMNIST-format data set."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.evaluation.reference import load_reference
from simulation.datasets import (
    HC18_CLASSES,
    REPO,
    SPLITS,
    BuiltDataset,
    DatasetBuildError,
    build_hc18,
    main,
    split_exams,
    write_npz,
)
from simulation.partition import load_medmnist_npz

HC18_FILES = 999  # pairs in the HC18 training set (README of the shared folder)


def fake_hc18(folder: Path, exam_sizes: list[int]) -> None:
    """A miniature HC18 folder: exam e has ``exam_sizes[e]`` 64×64 images; HC grows with the exam
    index and a brighter disc of radius ∝ HC is drawn, so the labels are visible in the pixels."""
    (folder / "images").mkdir(parents=True)
    rows = []
    yy, xx = np.mgrid[:64, :64]
    for e, n in enumerate(exam_sizes):
        for k in range(n):
            name = f"{e:03d}_HC.png" if k == 0 else f"{e:03d}_{k + 1}HC.png"
            hc = 50.0 + 10.0 * e + k
            disc = (yy - 32) ** 2 + (xx - 32) ** 2 < (hc / 10.0) ** 2
            Image.fromarray(np.where(disc, 200, 30).astype(np.uint8)).save(folder / "images" / name)
            rows.append({"file": name, "exam_id": f"{e:03d}", "head_circumference_mm": f"{hc:.2f}"})
    with (folder / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "exam_id", "head_circumference_mm"])
        writer.writeheader()
        writer.writerows(rows)


def assert_medmnist_format(built: BuiltDataset, total: int) -> None:
    for split in SPLITS:
        images, labels = built.arrays[f"{split}_images"], built.arrays[f"{split}_labels"]
        assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
        assert labels.dtype == np.uint8 and labels.shape == (images.shape[0], 1)
        assert built.exams[split].shape == (images.shape[0],)
        assert set(np.unique(labels).tolist()) == {0, 1}, f"{split} lacks a class"
    assert sum(built.arrays[f"{s}_images"].shape[0] for s in SPLITS) == total
    train, val, test = (set(built.exams[s].tolist()) for s in SPLITS)
    assert not (train & val or train & test or val & test), "an exam spans two splits"


def test_split_exams_keeps_exams_whole_and_hits_the_shares() -> None:
    # prepare: 300 exams of 1-4 images (like HC18's mix)
    sizes = np.random.default_rng(5).choice([1, 1, 1, 1, 2, 3, 4], size=300)
    exams = np.repeat([f"{e:03d}" for e in range(sizes.size)], sizes)

    # act
    split = split_exams(exams, seed=3)

    # assert: each exam in one split; image shares within one exam (4 images) of 55/15/30 %
    for e in np.unique(exams):
        assert np.unique(split[exams == e]).size == 1
    counts = np.bincount(split, minlength=3)
    assert np.all(np.abs(counts - np.array([0.55, 0.15, 0.30]) * exams.size) <= 4)
    assert np.array_equal(split, split_exams(exams, seed=3))
    assert not np.array_equal(split, split_exams(exams, seed=4))


def test_split_exams_gives_every_split_an_exam_when_there_are_few() -> None:
    split = split_exams(np.array(["a", "b", "c"]), seed=0)
    assert sorted(split.tolist()) == [0, 1, 2]


def test_build_from_a_miniature_folder(tmp_path: Path) -> None:
    # prepare: 40 exams, some with several images
    sizes = [1, 2, 1, 3, 1, 1, 4, 1, 2, 1] * 4
    fake_hc18(tmp_path / "hc18", sizes)

    # act
    built = build_hc18(tmp_path / "hc18", seed=1)

    # assert: format, exam-disjoint splits, the threshold is the training median, labels follow it
    assert_medmnist_format(built, sum(sizes))
    train_hc = 50.0 + 10.0 * np.array([int(e) for e in built.exams["train"]])
    assert built.threshold_mm == pytest.approx(np.median(train_hc), abs=5.0)
    assert built.class_names == HC18_CLASSES == ("small-head", "large-head")
    again = build_hc18(tmp_path / "hc18", seed=1)
    for key, value in built.arrays.items():
        assert np.array_equal(value, again.arrays[key])


def test_write_refuses_the_repository_and_round_trips_through_both_loaders(tmp_path: Path) -> None:
    # prepare
    fake_hc18(tmp_path / "hc18", [1, 2, 1, 1, 3, 1, 1, 2, 1, 1, 1, 1])
    built = build_hc18(tmp_path / "hc18")
    out = tmp_path / "out" / "hc18-28.npz"

    # act
    with pytest.raises(DatasetBuildError, match="inside the repository"):
        write_npz(built, REPO / "medsynth-output" / "hc18-28.npz")
    with pytest.raises(DatasetBuildError, match=r"\.npz"):
        write_npz(built, tmp_path / "hc18-28.zip")
    write_npz(built, out)

    # assert: MedMNIST keys; the loaders of the simulation and of the evaluation agree on classes
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(built.arrays)
    source = load_medmnist_npz(out, "train")
    assert source.class_names == HC18_CLASSES
    assert source.images.shape == built.arrays["train_images"].shape
    reference = load_reference(out, 32)
    assert reference.class_names == HC18_CLASSES
    assert len(reference.train) == built.arrays["train_images"].shape[0]
    assert reference.held_out is not None and len(reference.held_out) == built.arrays["val_images"].shape[0]
    assert not (REPO / "medsynth-output" / "hc18-28.npz").exists()


def test_cli_builds_and_reports_a_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_hc18(tmp_path / "hc18", [1, 1, 2, 1, 1, 1, 1, 1])
    assert main(["hc18", "--source", str(tmp_path / "hc18"), "--out", str(tmp_path / "a.npz")]) == 0
    assert "small-head" in capsys.readouterr().out and (tmp_path / "a.npz").is_file()
    assert main(["hc18", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "b.npz")]) == 2
    assert "metadata.csv" in capsys.readouterr().err and not (tmp_path / "b.npz").exists()


def test_real_hc18(shared_data_dir: Path) -> None:
    # prepare
    folder = shared_data_dir / "segmentation" / "hc18"
    if not (folder / "metadata.csv").is_file():
        pytest.skip(f"HC18 not found at {folder} (../shared/data/segmentation/hc18)")

    # act
    built = build_hc18(folder, seed=0)
    again = build_hc18(folder, seed=0)

    # assert: all 999 images, exam-disjoint, ~55/15/30 %, balanced training classes, deterministic
    assert_medmnist_format(built, HC18_FILES)
    sizes = [built.arrays[f"{s}_images"].shape[0] for s in SPLITS]
    assert sizes == [550, 150, 299]
    assert built.counts()["train"] == [275, 275]
    assert built.threshold_mm == pytest.approx(174.11, abs=0.01)
    for key, value in built.arrays.items():
        assert np.array_equal(value, again.arrays[key])
