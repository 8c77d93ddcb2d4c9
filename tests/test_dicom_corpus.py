"""Real files: pydicom's own test files (with its deliberately broken ones) and ../shared/data/dicom.

Each file is either loaded with the shape its header declares and values in [0, 1], or
rejected with the reason listed here. A file missing from the lists must load.
"""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from common.dicom.read import DicomImage, DicomRejected, read_image_frames

BUNDLED = Path(pydicom.data.__file__).parent / "test_files"

BUNDLED_REJECTED = {
    # RT plans / structure sets stored without File Meta: read as bare datasets, not images
    "ExplVR_BigEndNoMeta.dcm": "not-an-image", "ExplVR_LitEndNoMeta.dcm": "not-an-image",
    "rtstruct.dcm": "not-an-image", "no_meta.dcm": "not-dicom", "*.dump": "not-dicom",
    "*.json": "not-dicom", "*.txt": "not-dicom", "*.gz": "not-dicom", "*.icc": "not-dicom",
    "dicomdirtests/TINY_ALPHA/README": "not-dicom",
    "JPEG2000-embedded-sequence-delimiter.dcm": "malformed",
    "MR_truncated.dcm": "truncated", "rtplan_truncated.dcm": "truncated",
    "meta_missing_tsyntax.dcm": "missing-transfer-syntax",
    "empty_charset_LEI.dcm": "invalid-header", "nested_priv_SQ.dcm": "invalid-header",
    "examples_palette.dcm": "unsupported-photometric",
    # 16 x 16 CT thumbnails of bone only (HU 498 .. 1489) under a W 100 / L 30 window: all white
    "dicomdirtests/77654033/CT2/17166": "blank", "dicomdirtests/77654033/CT2/17196": "blank",
    "dicomdirtests/DICOMDIR-nooffset": "truncated",
    "dicomdirtests/DICOMDIR*": "not-an-image", "dicomdirtests/TINY_ALPHA/DICOMDIR": "not-an-image",
    "dicomdirtests/TINY_ALPHA/PT*": "not-an-image",  # (0004,xxxx) records, no Image Pixel module
    "UN_sequence.dcm": "not-an-image", "badVR.dcm": "not-an-image", "priv_SQ.dcm": "not-an-image",
    "no_meta_group_length.dcm": "not-an-image", "liver_*1frame.dcm": "not-an-image",
    "reportsi*.dcm": "not-an-image", "rtdose*.dcm": "not-an-image", "rtplan.dcm": "not-an-image",
    "test-SR.dcm": "not-an-image", "waveform_ecg.dcm": "not-an-image",
}
SHARED_REJECTED = {
    "*/LICENSE": "not-dicom", "*/README.md": "not-dicom",
    "dicomparser/deflate/report_dfl": "not-an-image", "dicomparser/deflate/wave_dfl": "not-an-image",
    "highdicom/seg_*": "not-an-image", "highdicom/sr_*": "not-an-image",
    "highdicom/sm_annotations.dcm": "not-an-image", "highdicom/sm_image*": "unsupported-sop-class",
    "pydicom-data/OBXXXX1A*": "unsupported-photometric", "pydicom-data/gdcm-US-ALOKA-16*":
    "unsupported-photometric", "pydicom-data/OT-PAL-8-face.dcm": "unsupported-photometric",
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "pydicom-data/liver*deflate.dcm": "unsupported-transfer-syntax",  # Deflated Image Frame (2023)
    "pydicom-data/liver*": "not-an-image", "pydicom-data/parametric_map_*": "not-an-image",
}


def expected_reason(rel: str, table: dict[str, str]) -> str | None:
    """The first matching pattern's reason (exact names first, then patterns in order)."""
    if rel in table:
        return table[rel]
    return next((reason for pattern, reason in table.items() if fnmatch.fnmatch(rel, pattern)), None)


def check_file(path: Path, rel: str, table: dict[str, str]) -> DicomImage | None:
    """Assert the file's outcome; returns the image when it loads."""
    reason = expected_reason(rel, table)
    if reason is not None:
        with pytest.raises(DicomRejected) as info:
            read_image_frames(path)
        assert info.value.reason == reason, (rel, info.value)
        return None
    image = read_image_frames(path)
    with warnings.catch_warnings(record=True):  # the reader recorded them already (image.warnings)
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # no-preamble files
    frames = int(header.get("NumberOfFrames") or 1)
    assert image.frames.shape == (frames, int(header.Rows), int(header.Columns)), rel
    assert image.frames.dtype == np.float32 and np.isfinite(image.frames).all(), rel
    assert 0.0 <= image.frames.min() <= image.frames.max() <= 1.0, rel
    return image


def corpus(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts)


def test_every_bundled_pydicom_test_file_loads_or_is_rejected_as_expected() -> None:
    # prepare
    files = corpus(BUNDLED)
    # act / assert
    loaded = [rel for rel in files if check_file(BUNDLED / rel, rel, BUNDLED_REJECTED) is not None]
    assert (len(files), len(loaded)) == (176, 79)  # pydicom 3.0.2's wheel


def test_every_shared_file_loads_or_is_rejected_as_expected(shared_data_dir: Path) -> None:
    # prepare: the four folders; the 192-slice series is checked on every 16th slice here
    root = shared_data_dir / "dicom"
    files = [rel for rel in corpus(root) if not rel.startswith("sag-anon-mr-brain/0")
             or int(rel.split("/")[1][:4]) % 16 == 1]
    # act / assert
    for rel in files:
        image = check_file(root / rel, rel, SHARED_REJECTED)
        if image is not None:
            assert image.frames.max() > image.frames.min(), f"{rel} decoded to a constant image"


LOSSLESS_TWINS = [  # (reference, same pixels in another transfer syntax)
    ("pydicom-data/emri_small.dcm", "pydicom-data/emri_small_RLE.dcm"),
    ("pydicom-data/emri_small.dcm", "pydicom-data/emri_small_big_endian.dcm"),
    ("pydicom-data/emri_small.dcm", "pydicom-data/emri_small_jpeg_2k_lossless.dcm"),
    ("pydicom-data/emri_small.dcm", "pydicom-data/emri_small_jpeg_ls_lossless.dcm"),
    ("pydicom-data/693_UNCR.dcm", "pydicom-data/693_J2KR.dcm"),
    ("pydicom-data/US1_UNCR.dcm", "pydicom-data/US1_J2KR.dcm"),
    ("pydicom-data/MR2_UNCR.dcm", "pydicom-data/MR2_J2KR.dcm"),
    ("dicomparser/CT1_UNC.explicit_little_endian.dcm", "dicomparser/CT1_UNC.explicit_big_endian.dcm"),
    ("dicomparser/CT1_UNC.explicit_little_endian.dcm", "dicomparser/CT1_UNC.implicit_little_endian.dcm"),
    ("dicomparser/CT1_UNC.explicit_little_endian.dcm",
     "dicomparser/encapsulated/single-frame/CT1_UNC.fragmented_no_bot_jpeg_ls.80.dcm"),
    ("dicomparser/encapsulated/multi-frame/CT0012.explicit_little_endian.dcm",
     "dicomparser/encapsulated/multi-frame/CT0012.fragmented_no_bot_jpeg_lossless.57.dcm"),
    ("dicomparser/encapsulated/multi-frame/CT0012.explicit_little_endian.dcm",
     "dicomparser/encapsulated/multi-frame/CT0012.fragmented_no_bot_jpeg_lossless.70.dcm"),
    ("dicomparser/encapsulated/multi-frame/CT0012.explicit_little_endian.dcm",
     "dicomparser/encapsulated/multi-frame/CT0012.not_fragmented_bot_rle.dcm"),
    ("pydicom-data/SC_rgb.dcm", "pydicom-data/SC_rgb_expb.dcm"),
]


@pytest.mark.parametrize(("reference", "twin"), LOSSLESS_TWINS)
def test_lossless_encodings_decode_to_identical_frames(shared_data_dir: Path, reference: str,
                                                       twin: str) -> None:
    root = shared_data_dir / "dicom"
    expected, actual = read_image_frames(root / reference), read_image_frames(root / twin)
    np.testing.assert_array_equal(actual.frames, expected.frames)


def test_htj2k_and_jpeg_ls_rgb_become_luminance(shared_data_dir: Path) -> None:
    # prepare: the same 640 x 480 RGB picture, HTJ2K lossless and lossy
    root = shared_data_dir / "dicom/pydicom-data"
    # act
    lossless = read_image_frames(root / "HTJ2KLossless_08_RGB.dcm").frames
    lossy = read_image_frames(root / "HTJ2K_08_RGB.dcm").frames
    # assert: same picture within lossy error; 8-bit luma over the nominal range 0..255
    assert lossless.shape == lossy.shape == (1, 480, 640)
    assert float(np.abs(lossless - lossy).mean()) < 0.01


def test_monochrome1_cr_is_windowed_then_inverted(shared_data_dir: Path) -> None:
    # prepare: CR chest PA, MONOCHROME1, 15-bit, JPEG 2000, Window Center 15000 / Width 30000
    path = shared_data_dir / "dicom/pydicom-data/RG1_J2KI.dcm"
    raw = {(0, 0): 18876, (1000, 900): 3521, (500, 1500): 9589, (1800, 100): 3175}
    # act
    frame = read_image_frames(path).frames[0]
    # assert: 1 - ((x - 14999.5) / 29999 + 0.5): bright (low) values become dark
    assert frame.shape == (1955, 1841)
    for (r, c), stored in raw.items():
        assert frame[r, c] == pytest.approx(1.0 - ((stored - 14999.5) / 29999 + 0.5), abs=1e-6)
    assert frame[1800, 100] > frame[0, 0]  # low stored value -> white in MONOCHROME1


def test_enhanced_multiframe_yields_distinct_frames(shared_data_dir: Path) -> None:
    frames = read_image_frames(shared_data_dir / "dicom/pydicom-data/emri_small.dcm").frames
    assert frames.shape == (10, 64, 64)
    assert len({frame.tobytes() for frame in frames}) == 10
