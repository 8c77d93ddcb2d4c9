"""DICOM SEG masks of image–mask pairs (issue 17): written by ``medsynth sample``, read by ``node prepare --pairs``."""

from __future__ import annotations

import copy
import os
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.seg import Segmentation, SegmentationTypeValues, SegmentDescription, segread
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from client.prepare.labels import LabelRule
from client.prepare.pipeline import prepare_site
from client.prepare.report import PrepareReport
from client.prepare.workers import FileJob, PrepareSettings, process_file
from common.dataset import load_cache, resize_to_square
from common.dicom.errors import REJECTION_REASONS
from common.export import SEG_SUFFIX, SERIES_DESCRIPTION, Provenance, export_images, synthetic_dicom
from common.pairs import MASK_SEGMENT_LABEL, mask_rel, to_mask_channel
from simulation.partition import SourceData, write_site_dicom
from simulation.phantoms import phantom_population

SALT = bytes(range(32))
SIZE = 32


@pytest.fixture
def seg_site(tmp_path: Path) -> tuple[SourceData, Path, list[str]]:
    """4 phantom patients x 2 images (48 px) as DICOM with PNG masks: source, data folder, paths by source index."""
    source = phantom_population(4, 2, image_size=48, seed=3)
    data_dir = tmp_path / "data"
    write_site_dicom(source, np.arange(8), data_dir, site_name="siteA", seed=1, masks=True)
    rels = [f"{source.class_names[int(source.labels[i])]}/siteA_{i:06d}.dcm" for i in range(8)]
    return source, data_dir, rels


def _segment(number: int) -> SegmentDescription:
    return SegmentDescription(number, f"part {number}", codes.SCT.MorphologicallyAbnormalStructure,
                              codes.SCT.Lesion, "MANUAL")


def _seg_of(image: Dataset, mask: np.ndarray) -> Segmentation:
    """A BINARY SEG of ``image`` holding ``mask`` (H, W) split in two segments (left and right half)."""
    image = copy.deepcopy(image)
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in image:  # the phantom files leave these out; highdicom copies them into the SEG
            setattr(image, keyword, "")
    halves = np.zeros((1, *mask.shape, 2), dtype=bool)  # (1, H, W, segments)
    middle = mask.shape[1] // 2
    halves[0, :, :middle, 0], halves[0, :, middle:, 1] = mask[:, :middle], mask[:, middle:]
    return Segmentation([image], halves, SegmentationTypeValues.BINARY, [_segment(1), _segment(2)], generate_uid(),
                        2, generate_uid(), 1, "test", "test", "0", "0")


def _expected_mask(mask: np.ndarray) -> np.ndarray:
    """The cache's mask channel (S, S) for a bool mask: the image's resize, then the threshold."""
    return to_mask_channel(resize_to_square(mask.astype(np.float32), SIZE))


def _rows(rels: list[str]) -> list[int]:
    """Source indices in the cache's row order (sorted paths)."""
    return sorted(range(len(rels)), key=lambda i: rels[i])


def _prepare(data_dir: Path, cache: Path, workers: int) -> tuple[PrepareReport, np.ndarray]:
    report = prepare_site(data_dir, cache, image_size=SIZE, salt=SALT, progress=False, pairs=True, workers=workers)
    return report, load_cache(cache).images


def test_prepare_takes_each_mask_from_the_seg_naming_its_image(seg_site: tuple[SourceData, Path, list[str]],
                                                               tmp_path: Path) -> None:
    # prepare: every PNG mask replaced by a two-segment SEG beside its image; one SEG directly in the data
    # folder (no label: read only as a SEG); one without per-frame source references (it names one image);
    # one image's mask split over two SEG files (left and right of column 20)
    source, data_dir, rels = seg_site
    assert source.masks is not None
    for i, rel in enumerate(rels):
        (data_dir / mask_rel(rel)).unlink()
        image, mask = pydicom.dcmread(data_dir / rel), source.masks[i].astype(bool)
        left = np.arange(48)[None, :] < 20  # (1, 48)
        seg = _seg_of(image, mask & left if i == 2 else mask)
        if i == 1:
            for frame in seg.PerFrameFunctionalGroupsSequence:
                del frame.DerivationImageSequence
        if i == 2:
            _seg_of(image, mask & ~left).save_as(data_dir / f"right_{i}{SEG_SUFFIX}")
        seg.save_as(data_dir / (f"seg_{i}{SEG_SUFFIX}" if i == 0 else rel.replace(".dcm", SEG_SUFFIX)))
    # act
    report, images = _prepare(data_dir, tmp_path / "cache", workers=0)
    # assert: every image kept with the union of its SEG's segments, aligned row by row; SEGs are no images
    expected = np.stack([_expected_mask(source.masks[i].astype(bool)) for i in _rows(rels)])
    assert images.shape == (8, 2, SIZE, SIZE) and np.array_equal(images[:, 1], expected)
    assert report.images_kept == 8 and report.masks_from_seg == 8
    assert report.rejected == {"not-an-image": 9}
    assert source.masks[2][:, :20].any() and source.masks[2][:, 20:].any()  # both SEG files of image 2 count
    images_only = prepare_site(data_dir, tmp_path / "cache", image_size=SIZE, salt=SALT, progress=False, workers=0)
    assert images_only.images_kept == 8  # without --pairs a SEG is still never an image, nor read as a mask
    assert images_only.rejected == {"not-an-image": 7, "no-label": 2}  # the two SEGs in the data folder itself
    assert int((expected > 0).sum()) > 0  # lesion pixels present: the comparison is not of empty masks


def test_broken_and_orphan_segs_are_rejected_and_lose_nothing_else(seg_site: tuple[SourceData, Path, list[str]],
                                                                   tmp_path: Path) -> None:
    # prepare (in sandboxed workers): image 0 has only a good SEG; image 1 only a broken SEG (its pixel
    # data cut short); a SEG names an image that is not in the folder; image 2 has a PNG mask (all
    # foreground) and a SEG that says otherwise: the PNG wins; image 3's only SEG is 24×24, not 48×48
    source, data_dir, rels = seg_site
    assert source.masks is not None
    images = [pydicom.dcmread(data_dir / rel) for rel in rels[:4]]
    for i in (0, 1, 3):
        (data_dir / mask_rel(rels[i])).unlink()
    smaller = copy.deepcopy(images[3])
    smaller.Rows = smaller.Columns = 24
    _seg_of(smaller, np.ones((24, 24), bool)).save_as(data_dir / rels[3].replace(".dcm", SEG_SUFFIX))
    _seg_of(images[0], source.masks[0].astype(bool)).save_as(data_dir / rels[0].replace(".dcm", SEG_SUFFIX))
    broken = _seg_of(images[1], source.masks[1].astype(bool))
    broken.PixelData = broken.PixelData[:8]
    broken.save_as(data_dir / rels[1].replace(".dcm", SEG_SUFFIX))
    stranger = images[1].copy()
    stranger.SOPInstanceUID = generate_uid()
    _seg_of(stranger, np.ones((48, 48), bool)).save_as(data_dir / f"orphan{SEG_SUFFIX}")
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(data_dir / mask_rel(rels[2]))
    _seg_of(images[2], np.zeros((48, 48), bool)).save_as(data_dir / rels[2].replace(".dcm", SEG_SUFFIX))
    # act
    report, cached = _prepare(data_dir, tmp_path / "cache", workers=2)
    # assert: one reason per file; the 6 other images all kept with their own masks
    assert report.rejected == {"mask-mismatch": 2, "mask-unreadable": 1, "no-mask": 1, "not-an-image": 3}
    assert report.images_kept == 6 and report.masks_from_seg == 1
    kept = [i for i in _rows(rels) if i not in (1, 3)]
    expected = {i: _expected_mask(source.masks[i].astype(bool)) for i in kept}
    expected[2] = np.ones((SIZE, SIZE), np.float32)  # the PNG mask, not the SEG's empty one
    assert np.array_equal(cached[:, 1], np.stack([expected[i] for i in kept]))


def test_dicom_export_writes_a_seg_naming_each_image(tmp_path: Path) -> None:
    # prepare: 4 synthetic pairs whose mask is the bright left part of the image (alignment is checkable)
    rng = np.random.default_rng(2)
    masks = np.broadcast_to(np.arange(16)[None, None, :] < rng.integers(3, 13, (4, 1, 1)), (4, 16, 16))
    masks = masks & (np.arange(16)[None, :, None] >= 2)  # rows 0-1 background: no mask is a plain column cut
    pixels = np.where(masks, 0.8, -0.8).astype(np.float32)
    rows = np.stack([pixels, np.where(masks, 1.0, -1.0)], axis=1).astype(np.float32)  # (4, 2, 16, 16)
    provenance = Provenance(model_sha256="0" * 64, checkpoint="round-0001.safetensors", round=1, run_id=None,
                            model_config={}, class_names=("normal", "lesion"), sites={})
    out = tmp_path / "export"
    # act
    export_images(rows, np.array([0, 1, 0, 1]), out, "dicom", provenance)
    # assert: <name>.seg.dcm beside <name>.dcm, reads back with highdicom as the exported mask
    image_paths = sorted(p for p in out.rglob("*.dcm") if not p.name.endswith(SEG_SUFFIX))
    assert len(image_paths) == 4
    for path in image_paths:
        k = int(path.stem.split("_")[1])
        image = pydicom.dcmread(path)
        seg_ds = pydicom.dcmread(path.with_name(path.stem + SEG_SUFFIX))
        seg = segread(path.with_name(path.stem + SEG_SUFFIX))
        assert seg.segmentation_type == SegmentationTypeValues.BINARY and seg.number_of_segments == 1
        assert seg.get_segment_description(1).segment_label == MASK_SEGMENT_LABEL
        referenced = seg_ds.ReferencedSeriesSequence[0]
        assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
        assert referenced.SeriesInstanceUID == image.SeriesInstanceUID != seg_ds.SeriesInstanceUID
        assert seg_ds.StudyInstanceUID == image.StudyInstanceUID
        mask = seg.get_pixels_by_source_instance([image.SOPInstanceUID])[0, :, :, 0]  # (16, 16)
        assert np.array_equal(mask.astype(bool), masks[k])
        for ds in (image, seg_ds):  # marked synthetic alike
            assert ds.SeriesDescription == SERIES_DESCRIPTION and ds.PatientID == "SYNTHETIC"
            assert ds.PatientName.family_name == "SYNTHETIC" and ds.BurnedInAnnotation == "NO"
            assert "not a real patient" in ds.ImageComments and "medsynth" in ds.DerivationDescription
    # and node prepare --pairs reads the SEGs alone back onto their images (PNG masks removed)
    for png in (out / "masks").rglob("*.png"):
        png.unlink()
    report = prepare_site(out, tmp_path / "cache", image_size=16, salt=SALT, progress=False, pairs=True, workers=0,
                          class_names=("normal", "lesion"))
    cached = load_cache(tmp_path / "cache").images
    assert report.images_kept == 4 and report.masks_from_seg == 4
    assert np.array_equal(cached[:, 0] > 0, cached[:, 1] > 0)  # bright part == mask, row by row


def _valid_seg_bytes() -> bytes:
    """One small SEG (16×16 image, two segments) as Part 10 bytes."""
    image = synthetic_dicom(np.arange(256, dtype=np.uint8).reshape(16, 16), label="a", study_uid=generate_uid(),
                            series_uid=generate_uid(), number=1, provenance=_PROVENANCE)
    out = BytesIO()
    _seg_of(image, np.arange(256).reshape(16, 16) % 3 == 0).save_as(out, enforce_file_format=True)
    return out.getvalue()


_PROVENANCE = Provenance(model_sha256="0" * 64, checkpoint="round-0001.safetensors", round=1, run_id=None,
                         model_config={}, class_names=("a",), sites={})
_SEG_BYTES = _valid_seg_bytes()
_DATASET_START = 144 + int.from_bytes(_SEG_BYTES[140:144], "little")  # after File Meta (its Group Length at 140)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.one_of(st.none(), st.integers(_DATASET_START, len(_SEG_BYTES))),
       flips=st.lists(st.tuples(st.integers(_DATASET_START, len(_SEG_BYTES) - 1), st.integers(0, 255)),
                      max_size=4))
def test_a_mangled_seg_is_a_typed_rejection(cut: int | None, flips: list[tuple[int, int]]) -> None:
    # prepare: the SEG's dataset truncated and with bytes overwritten, in a class folder of a pair run
    data = bytearray(_SEG_BYTES[:cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "a" / f"x{SEG_SUFFIX}").write_bytes(bytes(data))
        settings_ = PrepareSettings(root=root, image_size=16, labels=LabelRule("folder", ("a",)), pairs=True)
        # act
        outcome = process_file(FileJob(f"a/x{SEG_SUFFIX}", os.lstat(root / "a" / f"x{SEG_SUFFIX}")), settings_)
    # assert: never an image, never an untyped error; a SEG that still reads carries one 16×16 mask
    event(outcome.reason or "kept")
    assert outcome.images is None and outcome.reason in REJECTION_REASONS
    assert outcome.reason != "internal-error", outcome.message
    assert all(part.shape == (16, 16) for part in outcome.segmentation)
