"""One DICOM file -> greyscale frames in [0, 1], or a typed rejection.

Every DICOM file is hostile until proven otherwise. :func:`read_image_frames` (a path) and
:func:`read_image_bytes` (bytes already read) run these steps, each able to refuse the file
with :class:`DicomRejected` before the next, more expensive one:

1. open inside the data folder, no link, regular file, size cap (``common.dicom.paths``);
2. byte structure: Part 10 framing, Transfer Syntax UID, every element and item length,
   delimiters, nesting, deflate inflated under a cap (``common.dicom.structure``);
3. parse with pydicom (only structurally valid bytes reach it);
4. header: a picture SOP class, Image Pixel geometry, photometric interpretation, decoded size
   Rows (0028,0010) x Columns (0028,0011) x Number of Frames (0028,0008) x Samples per Pixel
   (0028,0002) x Bits Allocated (0028,0100) / 8 against a cap (``common.dicom.header``);
5. the caller's ``screen`` (modality / body part selection, label lookup);
6. native pixel data as long as declared; a decoder installed; compressed frames declaring
   the same size as the header (``common.dicom.codestream``);
7. decode, then the display pipeline (``common.dicom.lut``): Modality LUT -> VOI LUT / window
   (or the modality's default) -> MONOCHROME1 inversion -> [0, 1]; colour to BT.601 luma;
8. blank frames (one constant grey: nothing to learn) are left out; a file with nothing else
   is rejected as ``blank``.

Time and memory per file are bounded by the caller (``client.prepare.workers`` runs this in a
worker process with a time limit and an address-space limit). Warnings (pydicom's, GDCM's, and
the reader's own about what it repaired or treated as absent) are recorded with the image
(``DicomImage.warnings``) for the caller to log, not printed by the worker.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from os import stat_result
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from common.dicom.codestream import check_codestream_sizes
from common.dicom.decode import decode_pixel_array
from common.dicom.errors import REJECTION_REASONS, DicomRejected, rejecting
from common.dicom.header import (
    MEDIA_STORAGE_DIRECTORY,
    NATIVE_SYNTAXES,
    PatientIdentity,
    PixelGeometry,
    check_decoded_size,
    check_decoder_available,
    check_image_sop_class,
    check_native_length,
    check_photometric,
    read_header_text,
    read_patient_identity,
    read_pixel_geometry,
)
from common.dicom.lut import to_unit_frames
from common.dicom.paths import check_dicomdir_references, read_file_bytes
from common.dicom.structure import StructureLimits, check_part10

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "REJECTION_REASONS", "DicomImage", "DicomRejected",
           "ReadLimits", "Screen", "decode_pixel_data", "drop_blank_frames", "read_image_bytes",
           "read_image_frames"]

DEFAULT_MAX_DECODED_BYTES = 256 * 2**20

Screen = Callable[[Dataset], None]  # raises DicomRejected to skip a file before decoding


@dataclass(frozen=True)
class ReadLimits:
    """Per-file caps; the defaults admit a 512 x 512 x 512 16-bit CT volume in one file."""

    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES  # decoded pixel array
    max_file_bytes: int = 512 * 2**20  # the file as stored
    max_inflated_bytes: int = 512 * 2**20  # a deflated dataset once inflated

    @property
    def structure(self) -> StructureLimits:
        return StructureLimits(max_inflated_bytes=self.max_inflated_bytes,
                               max_value_bytes=max(self.max_file_bytes, self.max_inflated_bytes))


@dataclass(frozen=True, eq=False)
class DicomImage:
    """Decoded frames (F, H, W) float32 in [0, 1] plus the header facts the caller keeps."""

    frames: np.ndarray
    patient_id: str | None  # Patient ID (0010,0020), None when absent or empty
    study_uid: str | None  # Study Instance UID (0020,000D), None when absent or empty
    modality: str  # Modality (0008,0060), "" when absent
    warnings: tuple[str, ...] = field(default=())  # pydicom's, GDCM's and the reader's own warnings


def read_image_frames(path: Path, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                      limits: ReadLimits | None = None, screen: Screen | None = None,
                      root: Path | None = None, expected: stat_result | None = None) -> DicomImage:
    """Read the file at ``path`` (inside ``root``, default its folder); see the module doc.

    ``expected`` is the ``lstat`` taken when the folder was listed: a file replaced since then
    is refused as ``file-changed``.
    """
    limits = limits or ReadLimits(max_decoded_bytes=max_decoded_bytes)
    root = (root or path.parent).resolve()
    data = read_file_bytes(path, root=root, max_bytes=limits.max_file_bytes, expected=expected)
    return read_image_bytes(data, limits=limits, screen=screen, directory=(path.parent, root))


def read_image_bytes(data: bytes, *, limits: ReadLimits | None = None, screen: Screen | None = None,
                     directory: tuple[Path, Path] | None = None) -> DicomImage:
    """Steps 2-7 of the module doc on bytes; ``directory`` = (file's folder, data root)."""
    limits = limits or ReadLimits()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frames, identity, modality = _read(data, limits, screen, directory)
        except MemoryError as exc:
            raise DicomRejected("out-of-memory", "ran out of memory while reading; lower the "
                                "caps or give the worker more memory") from exc
    messages = tuple(dict.fromkeys(str(w.message) for w in caught))
    return DicomImage(frames=frames, patient_id=identity.patient_id, study_uid=identity.study_uid,
                      modality=modality, warnings=messages)


def _read(data: bytes, limits: ReadLimits, screen: Screen | None,
          directory: tuple[Path, Path] | None) -> tuple[np.ndarray, PatientIdentity, str]:
    part = check_part10(data, limits.structure)
    with rejecting("malformed", "pydicom cannot parse the dataset"):
        ds = dcmread(BytesIO(part.data))
    with rejecting("invalid-header", "malformed header value"):
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
        if sop == MEDIA_STORAGE_DIRECTORY and directory is not None:
            count = check_dicomdir_references(ds, *directory)
            raise DicomRejected("not-an-image", f"a DICOMDIR (media index) with {count} references; "
                                "the files it lists are read from the folder itself")
        check_image_sop_class(ds)
        geometry = read_pixel_geometry(ds)
        check_photometric(geometry)
        check_decoded_size(geometry, limits.max_decoded_bytes)
        identity, modality = read_patient_identity(ds), read_header_text(ds, "Modality").upper()
    if screen is not None:
        with rejecting("invalid-header", "cannot read the attributes used for selection or labels"):
            screen(ds)
    if "PixelData" not in ds:
        other = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
        hint = f" (only {other[0]}, which is not supported)" if other else ""
        raise DicomRejected("no-pixel-data", f"no Pixel Data (7FE0,0010){hint}")
    check_native_length(geometry, part.transfer_syntax, part.pixel_data_length)
    if part.transfer_syntax not in NATIVE_SYNTAXES:
        check_decoder_available(part.transfer_syntax, geometry.samples_per_pixel)
        with rejecting("decode-failed", "cannot read the compressed frames"):
            check_codestream_sizes(ds.PixelData, geometry.rows, geometry.columns,
                                   geometry.samples_per_pixel)
    raw = decode_pixel_data(ds, geometry)
    return drop_blank_frames(raw, to_unit_frames(raw, ds)), identity, modality


def drop_blank_frames(raw: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``frames`` without those of one constant grey; ``blank`` when no frame is left.

    A frame is blank when its displayed values are all equal: every stored value is the same,
    or the window (Window Center (0028,1050) / Width (0028,1051), VOI LUT Sequence (0028,3010))
    maps all of them to one grey (it covers none of them).
    """
    keep = np.array([frame.max() > frame.min() for frame in frames], dtype=bool)
    if keep.all():
        return frames
    if keep.any():
        warnings.warn(f"{int((~keep).sum())} of {len(frames)} frames are blank (one constant grey) "
                      "and were left out", stacklevel=2)
        return np.asarray(frames[keep])
    low, high = raw.min(), raw.max()
    count = "the frame" if len(frames) == 1 else f"all {len(frames)} frames"
    if all(frame.min() == frame.max() for frame in raw):
        shown = f"the same stored value ({low})" if low == high else "one stored value per frame"
        raise DicomRejected("blank", f"every pixel of {count} has {shown}: a blank image")
    raise DicomRejected("blank", f"the stored values vary ({low} .. {high}) but all map to one grey "
                        f"in {count} after the Modality LUT and the window: the window covers none "
                        "of them",
                        "check Window Center / Width (0028,1050)/(0028,1051) or the VOI LUT Sequence "
                        "(0028,3010) in a viewer; correct them in the PACS and export again, or "
                        "exclude the file")


def decode_pixel_data(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """Decode Pixel Data (7FE0,0010) to (F, H, W) or (F, H, W, 3); YBR is returned as RGB.

    The decoder is chosen by ``common.dicom.decode`` (pylibjpeg, then Pillow, then GDCM for
    greyscale JPEG Process 1/2/4 only).
    """
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    with rejecting("decode-failed", "cannot decode pixel data"):
        arr = decode_pixel_array(ds, syntax, getattr(ds.file_meta.get("TransferSyntaxUID"), "name", syntax))
    shape: tuple[int, ...] = (geometry.frames, geometry.rows, geometry.columns)
    if geometry.samples_per_pixel > 1:
        shape = (*shape, geometry.samples_per_pixel)
    if arr.size != int(np.prod(shape)):
        raise DicomRejected("decode-failed", f"decoded {arr.shape}, expected {shape}")
    return arr.reshape(shape)
