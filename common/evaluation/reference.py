"""Real reference images for the evaluation: a MedMNIST ``.npz`` or a prepared hospital cache.

What each part is used for:

* ``train``: the real training split. The domain feature extractor and the TRTR classifier are
  trained on it; FD, KID and precision/recall compare the synthetic set with it; memorization
  measures the distance of each synthetic image to its nearest image in it.
* ``test``: the real test split on which TSTR and TRTR classifiers are scored.
* ``held_out``: real images the generator was *not* trained on, for memorization (the nearest
  held-out image is the yardstick for "close"). ``None`` when there are none.

Sources:

* MedMNIST v2 ``.npz`` (``train/val/test_images`` uint8): train, test as given, ``val`` as the
  held-out set. Pixels go through the same chain as a hospital's ``prepare`` of the DICOM files
  the simulation writes (Secondary Capture without a window, so each frame's own min–max is
  its window): min–max to [0, 1], zero-pad to a square, Pillow BILINEAR on float to the model's
  side, then [0, 1] → [-1, 1]. ``tests/test_eval_reference.py`` checks the two agree.
* a prepared cache folder (``dataset.npz`` written by ``medsynth node prepare``): split by
  patient (a fixed, seeded 80/20 draw over patient indices) into train and test; the held-out
  set is another prepared folder given by the caller (data the federation never saw), if any.
  A pair cache (``node prepare --pairs``, ``common.pairs``) contributes its image channel only:
  masks are no images, so they enter no feature, distance or classifier here (a pair model's
  masks are judged by ``common.evaluation.segmentation``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.dataset import CACHE_FILE, DatasetError, LocalDataset, load_cache, resize_to_square
from common.errors import UserError
from common.pairs import IMAGE_CHANNEL

_MEDMNIST_CLASSES = {"pneumoniamnist": ("normal", "pneumonia"), "hc18-28": ("small-head", "large-head")}
TEST_SHARE = 0.2  # share of patients of a prepared cache used as the real test split


class ReferenceDataError(UserError, ValueError):
    """The reference data cannot be read or has no usable split; the message says what to pass."""


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """float32 images (N, 1, S, S) in [-1, 1] and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 1 or self.labels.shape != (self.images.shape[0],):
            raise ReferenceDataError(f"images (N, 1, S, S) and labels (N,) expected, got "
                                     f"{self.images.shape} and {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True, eq=False)
class ReferenceData:
    """The real images an evaluation compares with; ``sha256`` identifies the source file."""

    name: str
    sha256: str
    class_names: tuple[str, ...]
    train: LabelledImages
    test: LabelledImages
    held_out: LabelledImages | None

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def class_shares(self) -> np.ndarray:
        """Share of each class in the training split (C,), the default TSTR class balance."""
        counts = np.bincount(self.train.labels, minlength=len(self.class_names)).astype(np.float64)
        shares: np.ndarray = counts / counts.sum()
        return shares


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unit_per_image(images: np.ndarray) -> np.ndarray:
    """(N, H, W) → float64 in [0, 1], each image by its own min–max (a constant image → 0).

    What ``prepare`` does with a DICOM file that has no window and no calibrated modality.
    """
    x = images.astype(np.float64)
    low = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.0)


def to_model_range(unit: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) in [0, 1] → (N, 1, size, size) float32 in [-1, 1]."""
    out = np.empty((unit.shape[0], 1, size, size), dtype=np.float32)
    for i, frame in enumerate(unit):
        out[i, 0] = resize_to_square(frame, size) * 2.0 - 1.0
    return out


def _medmnist(path: Path, size: int) -> ReferenceData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ReferenceDataError(f"cannot read {path}: {exc}") from exc

    def split(name: str) -> LabelledImages:
        if f"{name}_images" not in raw or f"{name}_labels" not in raw:
            raise ReferenceDataError(f"{path.name} has no '{name}_images'/'{name}_labels'; "
                                     "pass a MedMNIST v2 .npz or a prepared cache folder")
        images, labels = raw[f"{name}_images"], raw[f"{name}_labels"]
        if images.ndim == 4 and images.shape[-1] == 3:  # colour → BT.601 luma, like the simulation
            images = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ReferenceDataError(f"{path.name} is multi-label; only single-label data sets are supported")
        unit = unit_per_image(np.rint(images).astype(np.uint8) if images.dtype != np.uint8 else images)
        return LabelledImages(to_model_range(unit, size), labels.reshape(-1).astype(np.int64))

    train, test, held = split("train"), split("test"), split("val")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    names = _MEDMNIST_CLASSES.get(path.stem, tuple(f"class{i}" for i in range(num_classes)))
    return ReferenceData(path.stem, file_sha256(path), names, train, test, held)


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """A cache's rows (N, C, S, S), C = 1 or an image–mask pair's 2 → the image channel (N, 1, size, size)."""
    image = images[:, IMAGE_CHANNEL : IMAGE_CHANNEL + 1]  # (N, 1, S, S): a pair's mask is left out
    if image.shape[-1] == size:
        return image
    return to_model_range((image[:, 0] + 1.0) / 2.0, size)


def rows_in_test_split(ds: LocalDataset, seed: int) -> np.ndarray:
    """Which rows (N,) of a prepared cache are the real test split: every image of ``TEST_SHARE`` of
    the patients (at least one), drawn with ``seed``; no patient is on both sides."""
    patients = np.random.default_rng(seed).permutation(ds.num_patients)
    is_test: np.ndarray = np.isin(ds.patients, patients[: max(1, round(TEST_SHARE * ds.num_patients))])
    return is_test


def _cache(folder: Path, size: int, held_out: Path | None, seed: int) -> ReferenceData:
    try:
        ds = load_cache(folder)
    except DatasetError as exc:
        raise ReferenceDataError(str(exc)) from exc
    if ds.num_patients < 2:
        raise ReferenceDataError(f"{folder} holds one patient; a train/test split needs at least two")
    is_test = rows_in_test_split(ds, seed)
    images = _resized(ds.images, size)
    held = None
    if held_out is not None:
        try:
            other = load_cache(held_out)
        except DatasetError as exc:
            raise ReferenceDataError(f"--held-out: {exc}") from exc
        if other.class_names != ds.class_names:
            raise ReferenceDataError(f"held-out classes {other.class_names} differ from {ds.class_names}")
        held = LabelledImages(_resized(other.images, size), other.labels)
    return ReferenceData(
        folder.name, file_sha256(folder / CACHE_FILE), ds.class_names,
        LabelledImages(images[~is_test], ds.labels[~is_test]),
        LabelledImages(images[is_test], ds.labels[is_test]),
        held,
    )


def load_reference(path: Path, image_size: int, *, held_out: Path | None = None, seed: int = 0) -> ReferenceData:
    """Load ``path`` (MedMNIST ``.npz`` or prepared cache folder) at the model's image side."""
    if path.is_file() and path.suffix == ".npz":
        if held_out is not None:
            raise ReferenceDataError("--held-out applies to a prepared cache folder; "
                                     "a MedMNIST .npz uses its val split")
        return _medmnist(path, image_size)
    if path.is_dir() and (path / CACHE_FILE).is_file():
        return _cache(path, image_size, held_out, seed)
    if path.is_dir():
        raise ReferenceDataError(f"{path} is not a prepared cache (no {CACHE_FILE}); run "
                                 f"`medsynth node prepare --data {path} --out CACHE` and pass CACHE")
    raise ReferenceDataError(f"reference {path} not found: pass a MedMNIST .npz or a prepared cache folder")
