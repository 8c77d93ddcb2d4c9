"""``common.evaluation.evaluate`` end to end on a tiny MedMNIST-shaped file, with generators whose answer is known.

The reference is a 28×28 two-class toy (class 1 carries a bright spot), written in the MedMNIST
``.npz`` layout; generators are stand-ins with the ``ImageSource`` interface: one returns
training images (a perfect memorizer), one returns noise. The real classifier and extractor
configurations run (a few seconds on these 240 images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.evaluation.evaluate import (
    TSTR_MULTIPLE,
    EvaluateOptions,
    evaluate,
    format_evaluation,
    trtr_score,
    tstr_score,
)
from common.evaluation.features import ExtractorCacheCorrupt, load_or_train_extractor
from common.evaluation.reference import ReferenceData, load_reference
from common.export import Provenance
from medsynth.cli import main
from tests.helpers import app_model

REQUIRED = {"fd", "kid", "tstr_auc", "tstr_acc", "trtr_auc", "trtr_acc", "memorization_rate"}


def _toy_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28): a grey disc at a jittered place; class 1 adds a bright spot."""
    yy, xx = np.mgrid[:28, :28]
    labels = rng.integers(0, 2, n)
    images = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(11, 17, 2)
        img = 90.0 * ((xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(60, 90)) + rng.normal(20, 8, (28, 28))
        if labels[i]:
            sx, sy = rng.uniform(9, 19, 2)
            img += 120.0 * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / 4.0)
        images[i] = np.clip(img, 0, 255)
    return images, labels.reshape(-1, 1).astype(np.uint8)


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ref") / "toymnist.npz"
    splits = {name: _toy_images(n, rng) for name, n in (("train", 160), ("val", 60), ("test", 80))}
    arrays = {f"{k}_{part}": v[i] for k, v in splits.items() for i, part in enumerate(("images", "labels"))}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One extractor/TRTR cache for the module: each is trained once."""
    return tmp_path_factory.mktemp("cache")


class FixedSource:
    """An ``ImageSource`` that draws from a fixed pool per class (or noise when ``pool`` is None)."""

    def __init__(self, pool: ReferenceData | None) -> None:
        self.pool = pool
        self.cfg = app_model(image_size=32, num_classes=2)
        self.class_names = ("class0", "class1")
        self.provenance = Provenance("0" * 64, "none", 0, None, {}, self.class_names, {})

    def sample(self, labels: np.ndarray, *, seed: int, latent_scale: float = 1.0,
               candidates: int = 1) -> np.ndarray:  # scale, candidates: unused
        rng = np.random.default_rng(seed)
        if self.pool is None:
            return rng.uniform(-1, 1, (labels.size, 1, 32, 32)).astype(np.float32)
        train = self.pool.train
        picks = [rng.choice(np.flatnonzero(train.labels == c)) for c in labels]
        return train.images[picks]

    def candidates_drawn(self, candidates: int) -> int:  # no discriminator: every draw is kept
        return 1


def test_tstr_of_real_as_synthetic_equals_trtr(toy_npz: Path, cache_dir: Path) -> None:
    # prepare
    ref = load_reference(toy_npz, 32)
    # act
    tstr = tstr_score(ref.train.images, ref.train.labels, ref)
    trtr = trtr_score(ref, cache_dir)
    # assert: one function, same data, same seed → identical figures; and the task is learnable
    assert tstr == trtr
    assert trtr.auc > 0.9


def test_a_copying_generator_is_flagged_and_a_noise_generator_is_not(
    toy_npz: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # prepare
    ref = load_reference(toy_npz, 32)
    opts = EvaluateOptions(checkpoint=tmp_path / "none", reference=toy_npz, out=tmp_path / "copy", cache_dir=cache_dir)
    # act
    copying = evaluate(opts, say=lambda _: None, generator=FixedSource(ref))
    noise = evaluate(EvaluateOptions(checkpoint=tmp_path / "none", reference=toy_npz, out=tmp_path / "noise",
                                     cache_dir=cache_dir, aggregate_only=True),
                     say=lambda _: None, generator=FixedSource(None))
    # assert: memorization, quality and usefulness tell the two apart
    assert set(copying) >= REQUIRED and set(noise) >= REQUIRED
    assert copying["memorization_rate"] == 1.0 and noise["memorization_rate"] == 0.0
    assert copying["fd"] < noise["fd"] / 10
    assert copying["precision"] > 0.9 and noise["precision"] == 0.0
    assert copying["tstr_auc"] > 0.85  # (noise's TSTR is left out: on this toy any brightness ranking scores)
    assert copying["n_synthetic"] == TSTR_MULTIPLE * 160 and "not Inception FID" in copying["fd_kind"]
    assert copying["extractor_sha256"] == noise["extractor_sha256"]  # one cached extractor for both
    # the picture of the closest pairs holds real images: written, but not in aggregate-only mode
    assert (tmp_path / "copy" / "closest_pairs.png").is_file()
    assert (tmp_path / "copy" / "evaluation.json").is_file()
    assert not (tmp_path / "noise" / "closest_pairs.png").exists()
    assert (tmp_path / "copy" / "real_vs_synthetic.png").is_file()  # real beside synthetic, by class
    assert not (tmp_path / "noise" / "real_vs_synthetic.png").exists()


def test_the_extractor_is_cached_hashed_and_refused_when_altered(toy_npz: Path, tmp_path: Path) -> None:
    # prepare
    ref = load_reference(toy_npz, 32)
    first = load_or_train_extractor(ref, cache_dir=tmp_path)
    # act
    again = load_or_train_extractor(ref, cache_dir=tmp_path)
    blob = bytearray(first.path.read_bytes())
    blob[-1] ^= 0xFF  # flip one bit of the last weight
    first.path.write_bytes(bytes(blob))
    # assert
    assert first.trained_now and not again.trained_now
    assert again.sha256 == first.sha256
    np.testing.assert_array_equal(again(ref.test.images), first(ref.test.images))
    with pytest.raises(ExtractorCacheCorrupt, match="hash check"):
        load_or_train_extractor(ref, cache_dir=tmp_path)


def test_evaluate_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # act
    code = main(["evaluate", "--checkpoint", str(tmp_path / "none"), "--reference", str(tmp_path / "x.npz")])
    # assert
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("medsynth: error: no valid checkpoint") and err.count("\n") == 1


@pytest.mark.parametrize(("n_test", "tstr_auc", "small", "swapped"),
                         [(40, 0.15, True, True), (40, 0.62, True, False), (2000, 0.2, False, True),
                          (2000, 0.81, False, False)])
def test_the_table_warns_of_a_small_test_split_and_reads_a_swapped_auc(
    n_test: int, tstr_auc: float, small: bool, swapped: bool
) -> None:
    # act
    text = format_evaluation({"n_test": n_test, "tstr_auc": tstr_auc, "trtr_auc": 0.9, "fd": 1.0})
    # assert: each note exactly when it applies, with what to do
    assert (f"only {n_test} real test images" in text) is small
    assert ("TSTR AUC well below 0.5" in text and "classes are swapped" in text) is swapped
    assert "TRTR AUC well below" not in text
