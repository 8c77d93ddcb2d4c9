"""Header checks that run before any pixel byte is decoded (PS3.3 C.7.6.3 Image Pixel module).

Each function reads a few attributes of the parsed dataset and either returns what it read or
raises :class:`DicomRejected`: is the object a picture (SOP Class UID, Modality), what size
will decoding produce (checked against a cap), is the photometric interpretation one with a
rule, is the native pixel data as long as declared, is there a decoder for the transfer syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from common.dicom.decode import can_decode
from common.dicom.errors import DicomRejected

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP Class of a DICOMDIR (PS3.4 Annex F)
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                             "1.2.840.10008.1.2.1.99"})

# SOP Class UID (0008,0016) roots of objects that are not pictures: SR and Key Objects (88),
# raw data / registration / segmentation (66.x), presentation states (11), waveforms (9),
# encapsulated documents (104), parametric maps (30), real-world value maps (67), surfaces
# (68), annotations (91), RT objects (481.x except RT Image 481.1), DICOMDIR (1.3.10).
_NON_IMAGE_SOP_ROOTS = (
    "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.11",
    "1.2.840.10008.5.1.4.1.1.9", "1.2.840.10008.5.1.4.1.1.104", "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.67", "1.2.840.10008.5.1.4.1.1.68", "1.2.840.10008.5.1.4.1.1.91",
    "1.2.840.10008.5.1.4.1.1.90", "1.2.840.10008.5.1.4.1.1.200", "1.2.840.10008.5.1.4.34",
    MEDIA_STORAGE_DIRECTORY,
)
_RT_ROOT, _RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.481.1"
# VL Whole Slide Microscopy Image: frames are tiles of one huge picture, not pictures.
_TILED_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.6"})
# Modality (0008,0060) values of non-image objects, for files with an unknown SOP class.
_NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "SEG", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC",
     "ANN", "RWV", "PLAN", "ECG", "HD", "AU", "M3D", "LABEL"}
)
_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")
_GREY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
# YBR_* here are returned as RGB by pydicom's decoders (YBR_FULL, _422) or by JPEG 2000 (ICT/RCT).
_COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


@dataclass(frozen=True)
class PixelGeometry:
    """The Image Pixel module attributes that fix the decoded size."""

    rows: int  # Rows (0028,0010)
    columns: int  # Columns (0028,0011)
    frames: int  # Number of Frames (0028,0008), 1 when absent
    samples_per_pixel: int  # Samples per Pixel (0028,0002)
    bits_allocated: int  # Bits Allocated (0028,0100)
    photometric: str  # Photometric Interpretation (0028,0004)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded array; 1-bit data is unpacked to one byte per sample."""
        per_sample = max(1, self.bits_allocated // 8)
        return self.rows * self.columns * self.frames * self.samples_per_pixel * per_sample


def _in_root(uid: str, root: str) -> bool:
    return uid == root or uid.startswith(root + ".")


def sop_class_name(uid: str) -> str:
    """``uid`` with its name from pydicom's UID registry (PS3.6 Table A-1), e.g.
    "1.2.840.10008.5.1.4.1.1.66.4 (Segmentation Storage)"; the bare UID when unknown."""
    name = UID(uid).name if _UID_TEXT.fullmatch(uid) else uid
    return uid if name == uid else f"{uid} ({name})"


def check_image_sop_class(ds: Dataset) -> None:
    """Reject objects whose SOP Class UID (0008,0016) or Modality (0008,0060) is not a picture."""
    meta = getattr(ds, "file_meta", None)
    fallback = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    sop = str(ds.get("SOPClassUID", "") or fallback).strip()
    if not sop:
        raise DicomRejected("invalid-header", "no SOP Class UID (0008,0016) nor Media Storage SOP "
                            "Class UID (0002,0002): not a DICOM object")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    rt_non_image = _in_root(sop, _RT_ROOT) and not _in_root(sop, _RT_IMAGE)
    if any(_in_root(sop, root) for root in _NON_IMAGE_SOP_ROOTS) or rt_non_image:
        raise DicomRejected("not-an-image", f"SOP Class UID (0008,0016) {sop_class_name(sop)} is not an "
                            "image")
    if modality in _NON_IMAGE_MODALITIES:
        raise DicomRejected("not-an-image", f"Modality (0008,0060) {modality} is not an image (SOP "
                            f"Class UID {sop_class_name(sop)})")
    if sop in _TILED_SOP_CLASSES:
        raise DicomRejected("unsupported-sop-class", f"SOP Class UID (0008,0016) {sop_class_name(sop)}: "
                            "its frames are tiles of one slide, not pictures")


def check_photometric(geometry: PixelGeometry) -> None:
    """Accept MONOCHROME1/2 with one sample and RGB/YBR with three (0028,0004), (0028,0002).

    PALETTE COLOR is rejected: its stored values are indices into a colour table, typically a
    pseudo-colour rendering or a label map, not an intensity the model could learn.
    """
    photometric, samples = geometry.photometric, geometry.samples_per_pixel
    if photometric in _GREY_PHOTOMETRICS and samples == 1:
        return
    if photometric in _COLOUR_PHOTOMETRICS and samples == 3:
        return
    if photometric in _GREY_PHOTOMETRICS | _COLOUR_PHOTOMETRICS:
        raise DicomRejected(
            "invalid-header", f"Photometric Interpretation {photometric} with {samples} samples"
        )
    raise DicomRejected(
        "unsupported-photometric",
        f"Photometric Interpretation (0028,0004) {photometric or '(absent)'} is not supported; "
        "convert to MONOCHROME2 or RGB",
    )


def _header_int(ds: Dataset, keyword: str, tag: str, *, default: int | None = None) -> int:
    """A positive integer attribute, or ``invalid-header`` naming the tag."""
    value = ds.get(keyword, default)
    if value is None and default is not None:
        value = default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        message = f"{keyword} {tag} is {value!r}, not an integer"
        raise DicomRejected("invalid-header", message) from exc
    if number < 1:
        raise DicomRejected("invalid-header", f"{keyword} {tag} is {number}, must be >= 1")
    return number


def read_pixel_geometry(ds: Dataset) -> PixelGeometry:
    """Read the Image Pixel module; no Rows and no Columns at all means not an image."""
    if "Rows" not in ds and "Columns" not in ds:
        raise DicomRejected(
            "not-an-image", "no Image Pixel module: Rows (0028,0010), Columns (0028,0011) absent"
        )
    bits = _header_int(ds, "BitsAllocated", "(0028,0100)")
    if bits not in (1, 8, 16, 32):
        raise DicomRejected("invalid-header", f"Bits Allocated (0028,0100) {bits} unsupported")
    return PixelGeometry(
        rows=_header_int(ds, "Rows", "(0028,0010)"),
        columns=_header_int(ds, "Columns", "(0028,0011)"),
        frames=_header_int(ds, "NumberOfFrames", "(0028,0008)", default=1),
        samples_per_pixel=_header_int(ds, "SamplesPerPixel", "(0028,0002)"),
        bits_allocated=bits,
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
    )


def check_decoded_size(geometry: PixelGeometry, max_decoded_bytes: int) -> None:
    """Refuse before decoding when the declared pixels would exceed the memory cap."""
    if geometry.decoded_bytes > max_decoded_bytes:
        raise DicomRejected(
            "too-large",
            f"declared {geometry.rows}x{geometry.columns}x{geometry.frames} frames x "
            f"{geometry.samples_per_pixel} samples x {geometry.bits_allocated} bits = "
            f"{geometry.decoded_bytes} bytes > cap {max_decoded_bytes}; "
            "raise max_decoded_bytes to accept it",
        )


class PatientIdentity(NamedTuple):
    """Patient ID (0010,0020) and Study Instance UID (0020,000D); None when absent or empty."""

    patient_id: str | None
    study_uid: str | None


def read_patient_identity(ds: Dataset) -> PatientIdentity:
    """Patient ID (0010,0020) and Study Instance UID (0020,000D), both read: the caller links
    them into privacy units (``client.prepare.patients``); neither replaces the other."""
    values = [str(ds.get(keyword, "") or "").strip() or None for keyword in ("PatientID", "StudyInstanceUID")]
    return PatientIdentity(*values)




def read_header_text(ds: Dataset, keyword: str) -> str:
    """A string attribute stripped, "" when absent or empty (multi-values joined with "\\")."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, str | bytes):
        text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
    else:
        text = "\\".join(str(v) for v in value) if hasattr(value, "__iter__") else str(value)
    return text.strip()


def native_pixel_bytes(geometry: PixelGeometry) -> int:
    """Bytes of native (uncompressed) Pixel Data the header implies (PS3.5 8.1.1).

    YBR_FULL_422 stores two samples per pixel (PS3.3 C.7.6.3.1.2); Bits Allocated 1 packs eight
    pixels per byte.
    """
    samples = 2 if geometry.photometric == "YBR_FULL_422" else geometry.samples_per_pixel
    count = geometry.rows * geometry.columns * geometry.frames * samples
    if geometry.bits_allocated == 1:
        return (count + 7) // 8
    return count * (geometry.bits_allocated // 8)


def check_native_length(geometry: PixelGeometry, syntax: str, value_length: int | None) -> None:
    """Native Pixel Data (7FE0,0010) shorter than the header implies is a truncated file."""
    if syntax not in NATIVE_SYNTAXES or value_length is None or value_length == 0xFFFFFFFF:
        return
    expected = native_pixel_bytes(geometry)
    if value_length < expected:
        raise DicomRejected("truncated", f"Pixel Data (7FE0,0010) holds {value_length} bytes, the "
                            f"header implies {expected}")


def check_decoder_available(syntax: str, samples_per_pixel: int = 1) -> None:
    """Refuse before decoding when no decoder medsynth uses (``common.dicom.decode``) reads the
    Transfer Syntax (0002,0010)."""
    name = sop_class_name(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomRejected("unsupported-transfer-syntax", f"pydicom has no pixel decoder for transfer "
                            f"syntax {name}") from exc
    if not can_decode(syntax, samples_per_pixel):
        missing = "; ".join(decoder.missing_dependencies) or "a decoder other than GDCM"
        raise DicomRejected("unsupported-transfer-syntax", f"no installed decoder for transfer "
                            f"syntax {name} (missing: {missing})",
                            "install medsynth's declared dependencies (the pylibjpeg plugins, "
                            "python-gdcm), or re-export the image uncompressed")
