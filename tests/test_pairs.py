"""Image–mask pairs (issue 17): phantom lesion masks, prepare's pairing, the pair model, the U-Net yardstick."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.prepare.pipeline import prepare_site
from common.checkpoint_model import model_config_from_arrays
from common.config import ConfigError, run_config
from common.dataset import load_cache, resize_to_square
from common.dp.train import PatientSampler, train_local_round
from common.evaluation.segmentation import (
    SMOOTHING_SIGMAS,
    Pairs,
    augment,
    dice_iou,
    gaussian_blur,
    matching_sigma,
    predict,
    sharpness,
    smooth,
    train_unet,
)
from common.export import Provenance, export_images
from common.models import build_models
from common.pairs import mask_rel, to_mask_channel
from common.weights import model_arrays
from simulation.partition import SourceData, SourceDataError, write_site_dicom
from simulation.phantoms import phantom_population

SALT = bytes(range(32))


@pytest.fixture
def pair_site(tmp_path: Path) -> tuple[SourceData, Path]:
    """4 phantom patients x 2 images (48 px) written as DICOM with their masks under masks/."""
    source = phantom_population(4, 2, image_size=48, seed=3)
    data_dir = tmp_path / "data"
    write_site_dicom(source, np.arange(8), data_dir, site_name="siteA", seed=1, masks=True)
    return source, data_dir


def _expected_rows(source: SourceData) -> np.ndarray:
    """Source indices in the cache's row order: sorted paths <class>/siteA_<k>.dcm, k = source index."""
    names = [f"{source.class_names[int(source.labels[i])]}/siteA_{i:06d}.dcm" for i in range(source.labels.size)]
    return np.argsort(np.array(names))


def test_phantom_masks_mark_the_drawn_lesions_only() -> None:
    # act
    source = phantom_population(12, 2, image_size=32, seed=7)
    # assert: lesion patients' images have lesion pixels, normal ones none; lesions are brighter than the rest
    assert source.masks is not None and source.masks.dtype == np.uint8 and set(np.unique(source.masks)) <= {0, 1}
    per_image = source.masks.sum(axis=(1, 2))
    assert (per_image[source.labels == 1] > 0).all() and (per_image[source.labels == 0] == 0).all()
    hu = source.images.astype(np.float64) - 1024
    lesion = source.labels == 1
    inside = hu[lesion][source.masks[lesion] == 1].mean()
    assert inside > 150  # organ ≈ 100 HU + 80..130 HU of contrast
    shifted = np.roll(source.masks[lesion], 4, axis=2) == 1  # a misaligned mask lands on darker tissue
    assert hu[lesion][shifted & (source.masks[lesion] == 0)].mean() < inside - 50


def test_masks_do_not_change_the_phantom_images() -> None:
    # the mask is drawn from no extra random numbers: the checksum of seed 3 before masks existed (b80940b)
    source = phantom_population(10, 2, image_size=32, seed=3)
    assert int(source.images.astype(np.int64).sum()) == 9_599_038
    assert int(source.masks.sum()) == 199  # type: ignore[union-attr]


def test_prepare_pairs_each_image_with_its_own_mask(pair_site: tuple[SourceData, Path], tmp_path: Path) -> None:
    # prepare
    source, data_dir = pair_site
    # act
    report = prepare_site(data_dir, tmp_path / "cache", image_size=32, salt=SALT, progress=False, pairs=True,
                          workers=0)
    ds = load_cache(tmp_path / "cache")
    # assert: 8 pairs, channel 1 is exactly the resized, thresholded mask of the same file
    assert ds.pairs and ds.images.shape == (8, 2, 32, 32)
    assert report.pairs and report.images_kept == 8 and report.rejected == {} and report.masks_without_image == 0
    assert report.files_seen == 8  # the masks are not counted as images
    assert source.masks is not None
    expected = np.stack([to_mask_channel(resize_to_square(source.masks[i].astype(np.float32), 32))
                         for i in _expected_rows(source)])
    assert np.array_equal(ds.images[:, 1], expected)
    assert set(np.unique(ds.images[:, 1])) <= {-1.0, 1.0}


def test_prepare_reports_unpaired_files_by_reason(pair_site: tuple[SourceData, Path], tmp_path: Path) -> None:
    # prepare: one image without mask, one unreadable mask, one of the wrong size, one mask naming no image
    _, data_dir = pair_site
    images = sorted((data_dir / "lesion").glob("*.dcm")) + sorted((data_dir / "normal").glob("*.dcm"))
    rels = [p.relative_to(data_dir).as_posix() for p in images]
    (data_dir / mask_rel(rels[0])).unlink()
    (data_dir / mask_rel(rels[1])).write_bytes(b"not a png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(data_dir / mask_rel(rels[2]))
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(data_dir / "masks" / "lesion" / "orphan.png")
    # act
    report = prepare_site(data_dir, tmp_path / "cache", image_size=32, salt=SALT, progress=False, pairs=True,
                          workers=0)
    # assert
    assert report.rejected == {"mask-mismatch": 1, "mask-unreadable": 1, "no-mask": 1}
    assert report.images_kept == 5 and report.masks_without_image == 1


def test_a_changed_mask_rebuilds_the_cache(pair_site: tuple[SourceData, Path], tmp_path: Path) -> None:
    # prepare
    _, data_dir = pair_site
    cache = tmp_path / "cache"
    prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False, pairs=True, workers=0)
    again = prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False, pairs=True, workers=0)
    first_mask = sorted((data_dir / "masks" / "lesion").glob("*.png"))[0]
    # act: paint the whole first lesion mask foreground (new mtime and content)
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(first_mask)
    os.utime(first_mask, ns=(1, 1))
    rebuilt = prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False, pairs=True, workers=0)
    # assert
    assert again.from_cache and not rebuilt.from_cache
    assert (load_cache(cache).images[0, 1] == 1.0).all()
    image_only = prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False, workers=0)
    assert not image_only.from_cache  # the mode is in the fingerprint
    assert load_cache(cache).images.shape[1] == 1
    assert image_only.label_counts == {"lesion": 4, "normal": 4}  # without --pairs masks/ is ignored, not a class
    assert image_only.files_seen == 8 and image_only.rejected == {}


def test_source_without_masks_refuses_pairs(tmp_path: Path) -> None:
    source = SourceData(images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64), patient_ids=None,
                        class_names=("a",))
    with pytest.raises(SourceDataError, match="no masks"):
        write_site_dicom(source, np.arange(2), tmp_path / "d", site_name="s", seed=0, masks=True)


def test_pair_model_has_two_channels_and_the_run_key_is_strict() -> None:
    # prepare
    run = run_config({"model.pairs": True})
    # act
    netG, netD = build_models(run.model, seed=0)
    fake = netG(torch.randn(3, run.model.latent_dim), torch.tensor([0, 1, 0]))
    # assert
    assert fake.shape == (3, 2, 32, 32)
    assert model_config_from_arrays(model_arrays(netG, netD), 2) == run.model  # a checkpoint says it is a pair model
    assert run_config().model.pairs is False  # the app default
    with pytest.raises(ConfigError, match=r"model\.pairs"):
        run_config({"model.pairs": 1})


def test_sampled_rows_keep_image_and_mask_together(pair_site: tuple[SourceData, Path], tmp_path: Path) -> None:
    # prepare: a pair cache and one DP round that records every real batch D sees
    _, data_dir = pair_site
    prepare_site(data_dir, tmp_path / "cache", image_size=32, salt=SALT, progress=False, pairs=True, workers=0)
    ds = load_cache(tmp_path / "cache")
    sampler = PatientSampler(ds.patients, 1.0, seed=0)
    # act
    idx = sampler.sample()
    run = run_config({"model.pairs": True, "train.local-steps": 2, "train.batch-size": 4})
    netG, netD = build_models(run.model, seed=0)
    result = train_local_round(netG, netD, ds, model=run.model, train=run.train, sample_rate=0.5,
                               noise_multiplier=1.0, max_grad_norm=1.0, device=torch.device("cpu"), seed=0)
    # assert: a sampled row is one cache row, both channels; the DP round is charged as for images
    rows = torch.from_numpy(ds.images)[torch.from_numpy(idx)]
    assert rows.shape[1] == 2 and all(np.array_equal(rows[k].numpy(), ds.images[i]) for k, i in enumerate(idx))
    assert result.charge is not None and (result.charge.sample_rate, result.charge.steps) == (0.5, 2)


def test_dice_and_iou_golden_numbers() -> None:
    truth = np.zeros((1, 4, 4), bool)
    truth[0, :2] = True  # 8 pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, 1:3] = True  # 8 pixels, 4 shared
    assert dice_iou(pred, truth) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(np.zeros_like(truth), np.zeros_like(truth)) == (1.0, 1.0)


def test_smoothing_keeps_a_flat_image_and_lowers_the_sharpness_of_a_checkerboard() -> None:
    # prepare: a flat image and a ±1 checkerboard (every neighbour differs by 2)
    flat = np.full((1, 1, 8, 8), 0.3, np.float32)
    board = np.where((np.arange(8)[:, None] + np.arange(8)) % 2 == 0, 1.0, -1.0).astype(np.float32)[None, None]
    # act
    smoothed = smooth(board, 1.0)
    # assert: the kernel sums to 1; sharpness 2 + 2 = 4 before, far less after; σ 0 is the identity
    assert np.allclose(smooth(flat, 1.5), flat, atol=1e-6)
    assert sharpness(board) == pytest.approx(4.0)
    assert sharpness(smoothed) < 0.5 and smooth(board, 0.0) is board


def test_the_matching_sigma_recovers_the_blur_of_a_blurred_copy_and_is_0_for_sharper_images() -> None:
    # prepare: "real" images of noisy discs; "synthetic" ones the same images blurred by σ = 1.5
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    discs = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 49 for cy, cx in rng.integers(8, 24, (20, 2))])
    real = (np.where(discs, 0.5, -0.5) + rng.normal(0, 0.3, discs.shape)).astype(np.float32)[:, None]
    # act
    sigma = matching_sigma(smooth(real, 1.5), real)
    sharper = matching_sigma(real + rng.normal(0, 0.3, real.shape).astype(np.float32), real)
    # assert
    assert sigma == 1.5 and sigma in SMOOTHING_SIGMAS
    assert sharper == 0.0 and matching_sigma(real[:0], real) == 0.0


def test_the_augmentations_blur_blurs_each_image_by_its_own_sigma() -> None:
    # prepare: two noisy images, σ 0.5 for the first and 2 for the second, the augmentation's radius 6
    images = np.random.default_rng(1).normal(0, 0.5, (2, 1, 24, 24)).astype(np.float32)
    # act
    blurred = gaussian_blur(torch.from_numpy(images), torch.tensor([0.5, 2.0]), 6).numpy()
    # assert: each equals the evaluation's smoothing at its σ (whose radius, ⌈3σ⌉, cuts 2e-8 of the weight at σ 0.5)
    assert np.allclose(blurred[:1], smooth(images[:1], 0.5), atol=1e-6)
    assert np.allclose(blurred[1:], smooth(images[1:], 2.0), atol=1e-6)
    assert sharpness(blurred[1:]) < sharpness(blurred[:1]) < sharpness(images)


def test_unet_learns_bright_discs() -> None:
    # prepare: discs brighter than a noisy background; the mask is the disc
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    masks = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 16 for cy, cx in rng.integers(4, 12, (256, 2))])
    images = (np.where(masks, 0.6, -0.6) + rng.normal(0, 0.2, masks.shape)).astype(np.float32)[:, None]
    pairs = Pairs(images, masks)
    # act
    net = train_unet(pairs.images[:192], pairs.masks[:192], seed=0, epochs=12, width=4)
    dice, _ = dice_iou(predict(net, pairs.images[192:]), pairs.masks[192:])
    # assert
    assert dice > 0.8  # measured 0.863 with augmentation (an untrained net: about the foreground share, 0.2)


def test_augmentation_moves_image_and_mask_together() -> None:
    # prepare: 64 discs of radius 5 at random places, the image the disc itself (white on black)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    masks = torch.from_numpy(np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 25
                                       for cy, cx in rng.integers(8, 24, (64, 2))])[:, None].astype(np.float32))
    images = masks * 2 - 1  # (64, 1, 32, 32)

    def centroids(weight: torch.Tensor) -> torch.Tensor:  # (N, 32, 32) → (N, 2) row, column
        grid = torch.arange(32.0)
        total = weight.sum((1, 2))
        return torch.stack([(weight * grid[:, None]).sum((1, 2)) / total, (weight * grid).sum((1, 2)) / total], 1)

    # act
    aug_images, aug_masks = augment(images, masks, torch.Generator().manual_seed(0))
    # assert: the mask stays binary, and each image's brightness above its background is centred where its
    # mask is, after zooms, rotations and shifts that moved the discs by 5.8 pixels on average
    assert set(aug_masks.unique().tolist()) <= {0.0, 1.0} and aug_images.min() >= -1 and aug_images.max() <= 1
    above_background = aug_images[:, 0] - aug_images[:, 0].amin(dim=(1, 2), keepdim=True)  # a contrast cut lifts it
    mask_at, image_at = centroids(aug_masks[:, 0]), centroids(above_background)
    assert (mask_at - image_at).norm(dim=1).max() < 0.5  # measured 0.32 pixels
    assert (mask_at - centroids(masks[:, 0])).norm(dim=1).mean() > 3  # the augmentation did move them


@pytest.mark.parametrize("fmt", ["dicom", "npz"])
def test_exported_pairs_keep_each_mask_with_its_image(fmt: str, tmp_path: Path) -> None:
    # prepare: 6 synthetic pairs whose mask is the bright half of the image (so alignment is checkable)
    rng = np.random.default_rng(1)
    side = np.arange(16)[None, None, :] < rng.integers(3, 13, (6, 1, 1))  # (6, 1, 16) per-image cut column
    masks = np.broadcast_to(side, (6, 16, 16))
    images = np.where(masks, 0.8, -0.8).astype(np.float32) + rng.uniform(-0.1, 0.1, (6, 16, 16)).astype(np.float32)
    rows = np.stack([images, np.where(masks, 1.0, -1.0)], axis=1).astype(np.float32)  # (6, 2, 16, 16)
    provenance = Provenance(model_sha256="0" * 64, checkpoint="round-0001.safetensors", round=1, run_id=None,
                            model_config={}, class_names=("normal", "lesion"), sites={})
    out = tmp_path / "export"
    # act
    files = export_images(rows, np.array([0, 1, 0, 1, 0, 1]), out, fmt, provenance)  # type: ignore[arg-type]
    # assert
    if fmt == "npz":
        with np.load(files[0]) as npz:
            assert np.array_equal(npz["masks"], masks.astype(np.uint8))
            assert np.array_equal(npz["images"] > 127, masks)
        return
    assert len(files) == 18  # 6 DICOM images, 6 DICOM SEG beside them, 6 PNG masks in masks/<class>/
    report = prepare_site(out, tmp_path / "cache", image_size=16, salt=SALT, progress=False, pairs=True, workers=0,
                          class_names=("normal", "lesion"))
    ds = load_cache(tmp_path / "cache")
    assert report.images_kept == 6 and report.masks_without_image == 0
    # the provenance sidecar beside the class folders; the SEGs (their images have PNG masks, which win)
    assert report.rejected == {"no-label": 1, "not-an-image": 6}
    assert report.masks_from_seg == 0
    assert np.array_equal(ds.images[:, 0] > 0, ds.images[:, 1] > 0)  # bright half == mask, row by row
