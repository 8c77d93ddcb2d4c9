"""DICOM Segmentation objects (PS3.3 A.51) as the masks of image–mask pairs, read with highdicom.

A SEG file is never a training image (``common.dicom.header.check_image_sop_class`` rejects it
as ``not-an-image``). In pair mode (``common.pairs``) the prepare worker reads such a file again
with :func:`read_segmentation`, in the same sandbox (time and memory limit) as any untrusted
DICOM file: the bytes pass the same structure checks (``common.dicom.structure``) before pydicom
parses them, and highdicom decodes the frames only once the declared size is under the cap.

What a SEG says. Each referenced image is named by its SOP Instance UID (0008,0018): in the
Referenced Series Sequence (0008,1115) / Referenced Instance Sequence (0008,114A), and per
frame in the Derivation Image Sequence (0008,9124) / Source Image Sequence (0008,2112). The
mask of one referenced image is the union of every segment on it: a pixel is foreground when
any segment covers it (BINARY and LABELMAP: a non-zero value; FRACTIONAL: at least half the
Maximum Fractional Value (0062,000E)). A referenced image without frames in the SEG (omitted
because empty, PS3.3 C.8.20.2) has an empty mask. Frames that name no source image are
accepted only when the SEG references exactly one image: they all belong to it.

A file whose SOP Class UID is not Segmentation Storage gives None (the caller keeps its other
verdict); a SEG that cannot be read this way is ``mask-unreadable``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from os import stat_result
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from common.dicom.errors import DicomRejected, rejecting
from common.dicom.header import read_header_text
from common.dicom.paths import read_file_bytes
from common.dicom.read import ReadLimits
from common.dicom.structure import check_part10

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # SOP Class UID (PS3.4 B.5)


@dataclass(frozen=True, eq=False)
class SegmentationMask:
    """One referenced image's mask: bool (H, W), True where any segment covers the pixel."""

    source_uid: str  # SOP Instance UID (0008,0018) of the image the mask belongs to
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class DicomSegmentation:
    """Every image mask one SEG file holds, and the warnings pydicom / highdicom raised on it."""

    masks: tuple[SegmentationMask, ...]
    warnings: tuple[str, ...] = ()


def read_segmentation(path: Path, *, limits: ReadLimits, root: Path,
                      expected: stat_result | None = None) -> DicomSegmentation | None:
    """The masks of the SEG file at ``path`` (inside ``root``); None when it is no SEG.

    Rejections before the SOP class is known keep their own reason (``not-dicom``, ``truncated``,
    ...); from there on every failure is ``mask-unreadable`` (``out-of-memory`` stays itself).
    """
    data = read_file_bytes(path, root=root, max_bytes=limits.max_file_bytes, expected=expected)
    part = check_part10(data, limits.structure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rejecting("malformed", "pydicom cannot parse the dataset"):
            ds = dcmread(BytesIO(part.data))
            sop = read_header_text(ds, "SOPClassUID") or read_header_text(ds.file_meta, "MediaStorageSOPClassUID")
        if sop != SEGMENTATION_STORAGE:
            return None
        try:
            masks = _masks(ds, limits.max_decoded_bytes)
        except MemoryError as exc:
            raise DicomRejected("out-of-memory", "ran out of memory while reading the DICOM SEG") from exc
        except DicomRejected as exc:
            if exc.reason in ("mask-unreadable", "out-of-memory"):
                raise
            raise DicomRejected("mask-unreadable", f"DICOM SEG: {exc.message}") from exc
    return DicomSegmentation(masks, tuple(dict.fromkeys(str(w.message) for w in caught)))


def _masks(ds: Dataset, max_decoded_bytes: int) -> tuple[SegmentationMask, ...]:
    """Check the declared size, then decode the union mask of every referenced image."""
    from highdicom.seg import Segmentation, SegmentationTypeValues

    with rejecting("mask-unreadable", "not a readable DICOM SEG"):
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, segments = int(ds.get("NumberOfFrames", 1) or 1), len(ds.SegmentSequence)
        if min(rows, columns, frames, segments) < 1:
            raise DicomRejected("mask-unreadable", f"declares {rows}×{columns} pixels, {frames} frames and "
                                f"{segments} segments")
        # decoded: one byte per stored pixel; one source image at a time as float32 per segment
        largest = max(rows * columns * frames, rows * columns * segments * 4)
        if largest > max_decoded_bytes:
            raise DicomRejected("mask-unreadable", f"declares {rows}×{columns} pixels × {frames} frames, "
                                f"{segments} segments: {largest} bytes decoded, over the cap of {max_decoded_bytes}")
        seg = Segmentation.from_dataset(ds, copy=False)
        referenced = [str(uid) for _, _, uid in seg.get_source_image_uids()]
        per_frame = list(_frame_sources(ds))
        if not per_frame:  # no frame names its source: all frames belong to the one referenced image
            if len(set(referenced)) != 1:
                raise DicomRejected("mask-unreadable", f"its frames name no source image and it references "
                                    f"{len(set(referenced))} images; one cannot tell which frame is whose")
            fractional = seg.segmentation_type == SegmentationTypeValues.FRACTIONAL
            cut = float(ds.get("MaximumFractionalValue", 1) or 1) / 2 if fractional else 0.5
            union = np.zeros((rows, columns), dtype=bool)  # (H, W)
            for number in range(1, frames + 1):
                union |= np.asarray(seg.get_stored_frame(number)) >= cut
            return (SegmentationMask(referenced[0], union),)
        masks = []
        for uid in dict.fromkeys(referenced + per_frame):
            # (1, H, W, segments): 0/1, or a fraction for FRACTIONAL; zeros where the SEG omitted empty frames
            pixels = seg.get_pixels_by_source_instance([uid], assert_missing_frames_are_empty=True,
                                                       skip_overlap_checks=True, dtype=np.float32)
            masks.append(SegmentationMask(uid, (pixels[0] >= 0.5).any(axis=-1)))
    return tuple(masks)


def _frame_sources(ds: Dataset) -> Iterator[str]:
    """SOP Instance UIDs of the source images the frames name (per-frame and shared functional groups)."""
    groups = [*ds.get("PerFrameFunctionalGroupsSequence", []), *ds.get("SharedFunctionalGroupsSequence", [])]
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if uid := read_header_text(source, "ReferencedSOPInstanceUID"):
                    yield uid
