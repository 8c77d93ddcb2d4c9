"""A pair model (issue 17) judged and used at a hospital: ``medsynth evaluate`` and ``node evaluate`` report the
segmentation numbers with FD and memorization of the images; ``node augment`` writes aligned image–mask pairs.

The caches are built by hand (discs brighter than their background, the mask is the disc) and the models are
tiny untrained pair generators or stand-ins whose answer is known; no federation is trained here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.augment import SYNTHETIC_DIR
from client.cli import evaluate_at_node
from common.checkpoint import save_checkpoint
from common.checkpoint_model import load_generator
from common.config import GLOBAL_MODEL_DIR
from common.dataset import LocalDataset, load_cache, save_cache
from common.evaluation.augment import ARMS
from common.evaluation.evaluate import EvaluateOptions, PairCacheRequired, evaluate
from common.evaluation.reference import load_reference, rows_in_test_split
from common.export import SIDECAR, Provenance, to_uint8
from common.models import build_models
from common.pairs import mask_rel
from common.weights import model_arrays
from medsynth.cli import main
from tests.helpers import app_model, toy_dataset

NAMES = ("normal", "lesion")
SEG_KEYS = {"dice_synthetic", "iou_synthetic", "dice_synthetic_unsmoothed", "smoothing_sigma", "dice_real", "iou_real",
            "agreement_dice", "ratio"}
IMAGE_KEYS = {"fd", "kid", "precision", "recall", "memorization_rate", "nearer_train_share"}


def pair_dataset(num_patients: int, seed: int) -> LocalDataset:
    """Two 32 px pairs per patient: a bright disc on a noisy background, the mask is the disc (channel 1)."""
    rng = np.random.default_rng(seed)
    n = 2 * num_patients
    yy, xx = np.mgrid[:32, :32]
    centres, radii = rng.uniform(10, 22, (n, 2)), rng.uniform(4, 8, n)
    masks = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 < radii[:, None, None] ** 2
    images = np.clip(np.where(masks, 0.6, -0.5) + rng.normal(0, 0.15, masks.shape), -1, 1)
    rows = np.stack([images, np.where(masks, 1.0, -1.0)], axis=1).astype(np.float32)  # (n, 2, 32, 32)
    patients = np.repeat(np.arange(num_patients), 2).astype(np.int64)
    return LocalDataset(rows, (patients % 2).astype(np.int64), patients, NAMES, patient_identity=True)


def write_cache(ds: LocalDataset, folder: Path) -> Path:
    save_cache(ds, folder, "fp-test", np.array([f"{p:064x}" for p in range(ds.num_patients)]))
    return folder


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site state folder: cache/ (12 patients of pairs), held-out/ (6 other patients), a tiny pair global model."""
    state = tmp_path / "site-0"
    write_cache(pair_dataset(12, seed=0), state / "cache")
    write_cache(pair_dataset(6, seed=1), tmp_path / "held-out")
    arrays = model_arrays(*build_models(app_model(pairs=True, g_width=8, d_width=8), seed=0))
    save_checkpoint(state / GLOBAL_MODEL_DIR, 3, arrays, [], class_names=NAMES, run_id=7)
    return state


class PairSource:
    """An ``ImageSource`` of pairs: copies of the cache's training rows (a perfect memorizer), or uniform noise."""

    def __init__(self, rows: np.ndarray | None) -> None:
        self.rows = rows
        self.cfg = app_model(pairs=True)
        self.class_names = NAMES
        self.provenance = Provenance("0" * 64, "none", 0, None, {}, NAMES, {})

    def sample(self, labels: np.ndarray, *, seed: int, latent_scale: float = 1.0,
               candidates: int = 1, say: Callable[[str], None] | None = None) -> np.ndarray:  # all but seed unused
        rng = np.random.default_rng(seed)
        if self.rows is None:
            return rng.uniform(-1, 1, (labels.size, 2, 32, 32)).astype(np.float32)
        return self.rows[rng.integers(0, self.rows.shape[0], labels.size)]

    def candidates_drawn(self, candidates: int) -> int:  # no filter: every draw is kept
        return 1


def test_a_pair_cache_as_reference_gives_its_images_only(site: Path, tmp_path: Path) -> None:
    # act
    reference = load_reference(site / "cache", 32, held_out=tmp_path / "held-out", seed=0)
    # assert: the image channel, split by patient as the pair evaluation splits the pairs; no mask anywhere
    ds, held = load_cache(site / "cache"), load_cache(tmp_path / "held-out")
    is_test = rows_in_test_split(ds, 0)
    assert np.array_equal(reference.train.images, ds.images[~is_test, :1])
    assert np.array_equal(reference.test.images, ds.images[is_test, :1])
    assert reference.held_out is not None and np.array_equal(reference.held_out.images, held.images[:, :1])


def test_pair_evaluation_reports_fd_and_catches_a_memorizer(site: Path, tmp_path: Path) -> None:
    # prepare: a generator that returns training pairs, and one that draws noise
    ds = load_cache(site / "cache")
    train_rows = ds.images[~rows_in_test_split(ds, 0)]

    def run(rows: np.ndarray | None, name: str) -> dict[str, object]:
        opts = EvaluateOptions(checkpoint=tmp_path / "none", reference=site / "cache", held_out=tmp_path / "held-out",
                               out=tmp_path / name, cache_dir=tmp_path / "models", unet_epochs=2, aggregate_only=True)
        return evaluate(opts, say=lambda _: None, generator=PairSource(rows))

    # act
    copier, noise = run(train_rows, "copier"), run(None, "noise")
    # assert: every copy is a training image (distance 0), no noise image is near one; FD tells them apart
    assert copier.keys() >= SEG_KEYS | IMAGE_KEYS and copier["kind"] == "segmentation"
    assert copier["memorization_rate"] == 1.0 and copier["nearer_train_share"] == 1.0
    assert noise["memorization_rate"] == 0.0
    assert isinstance(copier["fd"], float) and isinstance(noise["fd"], float) and copier["fd"] < noise["fd"] / 10
    assert copier["extractor_sha256"] == noise["extractor_sha256"]  # one ruler for both
    assert "masks not included" in str(copier["fd_kind"])


def test_evaluate_prints_dice_fd_and_memorization(site: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # act
    code = main(["evaluate", "--checkpoint", str(site / GLOBAL_MODEL_DIR), "--reference", str(site / "cache"),
                 "--held-out", str(tmp_path / "held-out"), "--out", str(tmp_path / "ev"),
                 "--cache-dir", str(tmp_path / "models")])
    # assert: the table has the U-Nets, FD and memorization; outside a hospital the closest pairs are drawn
    out = capsys.readouterr().out
    assert code == 0
    for phrase in ("U-Net trained on synthetic pairs", "agreement", "images only: domain FD", "memorization rate"):
        assert phrase in out, phrase
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result.keys() >= SEG_KEYS | IMAGE_KEYS and 0 <= result["memorization_rate"] <= 1
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["closest_pairs.png", "evaluation.json"]


def test_node_evaluate_of_a_pair_model_writes_numbers_only(site: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # act
    code = evaluate_at_node(site, site / "cache", held_out=tmp_path / "held-out", seed=0)
    # assert: Dice/IoU, agreement, FD and memorization in evaluation.json, every value a number or a short text
    assert code == 0
    assert "images only: domain FD" in capsys.readouterr().out
    folder = site / "evaluation"
    assert [p.name for p in folder.iterdir()] == ["evaluation.json"]  # no picture of a real image
    result = json.loads((folder / "evaluation.json").read_text())
    assert result.keys() >= SEG_KEYS | IMAGE_KEYS and result["aggregate_only"] is True
    assert all(isinstance(v, int | float | str | bool) for v in result.values()), result
    assert all(len(v) < 300 for v in result.values() if isinstance(v, str))
    assert 0 <= result["dice_synthetic"] <= 1 and 0 <= result["agreement_dice"] <= 1 and result["fd"] >= 0


def test_a_pair_model_refuses_a_cache_without_masks(site: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: the hospital's cache holds images only (prepared without --pairs)
    images_only = write_cache(toy_dataset(num_patients=10, per_patient=2), tmp_path / "images-only")
    # act / assert: node evaluate raises the typed error; the command prints one line and exits 2
    with pytest.raises(PairCacheRequired, match="prepared without --pairs"):
        evaluate_at_node(site, images_only, held_out=None, seed=0)
    code = main(["evaluate", "--checkpoint", str(site / GLOBAL_MODEL_DIR), "--reference", str(images_only),
                 "--aggregate-only", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "node prepare --pairs" in err
    assert not (tmp_path / "ev").exists() and not (site / "evaluation").exists()


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_node_augment_of_a_pair_model_writes_aligned_pairs(site: Path, fmt: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # act
    code = main(["node", "augment", "--site-dir", str(site), "--class", "lesion", "--n", "5", "--seed", "4",
                 "--format", fmt])
    # assert: 5 images and 5 masks, each mask the sampled mask channel of its own image
    assert code == 0, capsys.readouterr().err
    (export,) = (site / SYNTHETIC_DIR).iterdir()
    drawn = load_generator(site / GLOBAL_MODEL_DIR).sample(np.full(5, 1), seed=4)  # (5, 2, 32, 32)
    assert drawn.shape == (5, 2, 32, 32)
    sidecar = json.loads((export / SIDECAR).read_text())
    assert sidecar["pairs"] is True and sidecar["count"] == 5 and sidecar["synthetic"] is True
    assert "other hospitals" in sidecar["sampling"]["privacy_note"]
    if fmt == "npz":
        with np.load(export / "synthetic.npz") as npz:
            assert np.array_equal(npz["images"], to_uint8(drawn[:, :1]))
            assert np.array_equal(npz["masks"], (drawn[:, 1] > 0).astype(np.uint8))
        return
    images = sorted((export / "lesion").glob("*.png"))
    assert len(images) == 5
    for k, path in enumerate(images):
        mask_path = export / mask_rel(path.relative_to(export).as_posix())
        assert mask_path.name == path.name
        assert np.array_equal(np.asarray(Image.open(path)), to_uint8(drawn[k : k + 1, :1])[0])
        assert np.array_equal(np.asarray(Image.open(mask_path)) > 127, drawn[k, 1] > 0)
    assert sorted(p.name for p in (export / "masks" / "lesion").iterdir()) == [p.name for p in images]


def test_train_classifier_reads_the_images_of_a_pair_cache_and_export(site: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: a pair export of the rare class beside the pair cache
    assert main(["node", "augment", "--site-dir", str(site), "--class", "lesion", "--n", "6", "--seed", "2"]) == 0
    # act
    code = main(["node", "train-classifier", "--site-dir", str(site), "--class", "lesion", "--n", "4",
                 "--bootstrap", "5", "--epochs", "1"])
    # assert: all four arms ran on the images (masks are no classifier input)
    assert code == 0, capsys.readouterr().err
    record = json.loads((site / "augment" / "comparison.json").read_text())
    assert [a["arm"] for a in record["arms"]] == list(ARMS) and record["extra"] == 4
