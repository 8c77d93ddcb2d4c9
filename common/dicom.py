"""One DICOM file -> greyscale frames in [0, 1], or a typed rejection.

Every DICOM file is hostile until proven otherwise, so all per-file parsing and decoding lives
behind :func:`read_image_frames`. It reads the header first (``stop_before_pixels``), rejects
non-image objects and checks the decoded size Rows (0028,0010) x Columns (0028,0011) x
Number of Frames (0028,0008) x Samples per Pixel (0028,0002) x Bits Allocated (0028,0100) / 8
against a cap *before* any pixel byte is read or decoded, then decodes and runs the display
pipeline in the order of PS3.4 N.2.1.1 for greyscale images:

    Modality LUT -> VOI LUT / windowing -> MONOCHROME1 inversion -> normalise to [0, 1]

Not yet handled here (a later hardening issue): deflate bombs (Deflated Explicit VR Little
Endian is inflated whole by pydicom even with ``stop_before_pixels``), decode timeouts,
symlinks and path traversal. Presentation LUTs (2050,0010)/(2050,0020) are ignored: training
needs a consistent grey scale, not a particular softcopy presentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import processing as pixel_processing
from pydicom.pixels.utils import pixel_array

DEFAULT_MAX_DECODED_BYTES = 256 * 2**20

REJECTION_REASONS = frozenset(
    {
        "unreadable",  # not a DICOM Part 10 file, or the parser failed
        "not-an-image",  # SR, SEG, presentation state, ... or no Image Pixel module
        "unsupported-sop-class",  # an image, but not one frame per picture (e.g. WSI tiles)
        "invalid-header",  # missing or inconsistent Image Pixel / LUT attributes
        "too-large",  # decoded size above the cap
        "unsupported-photometric",  # e.g. PALETTE COLOR, YBR_PARTIAL_420
        "no-pixel-data",  # no Pixel Data (7FE0,0010)
        "decode-failed",  # pixel data present but could not be decoded
    }
)


# SOP Class UID (0008,0016) roots of objects that are not pictures: SR and Key Objects (88),
# raw data / registration / segmentation (66.x), presentation states (11), waveforms (9),
# encapsulated documents (104), parametric maps (30), real-world value maps (67), surfaces
# (68), annotations (91), RT objects (481.x except RT Image 481.1), DICOMDIR (1.3.10).
_NON_IMAGE_SOP_ROOTS = (
    "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.11",
    "1.2.840.10008.5.1.4.1.1.9", "1.2.840.10008.5.1.4.1.1.104", "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.67", "1.2.840.10008.5.1.4.1.1.68", "1.2.840.10008.5.1.4.1.1.91",
    "1.2.840.10008.5.1.4.1.1.90", "1.2.840.10008.5.1.4.1.1.200", "1.2.840.10008.5.1.4.34",
    "1.2.840.10008.1.3.10",
)
_RT_ROOT, _RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.481.1"
# VL Whole Slide Microscopy Image: frames are tiles of one huge picture, not pictures.
_TILED_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.6"})
# Modality (0008,0060) values of non-image objects, for files with an unknown SOP class.
_NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "SEG", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC",
     "ANN", "RWV", "PLAN", "ECG", "HD", "AU", "M3D", "LABEL"}
)
# Modality and VOI attributes copied into a per-frame view (see frame_transform_dataset).
_FRAME_TRANSFORM_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "VOILUTSequence",
)
_GREY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
# YBR_* here are returned as RGB by pydicom's decoders (YBR_FULL, _422) or by JPEG 2000 (ICT/RCT).
_COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


class DicomRejected(Exception):
    """A file that cannot become training pixels; ``reason`` is a stable short code."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown reason {reason!r}: use one of {sorted(REJECTION_REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, eq=False)
class DicomImage:
    """Decoded frames (F, H, W) float32 in [0, 1] plus the two header facts we keep."""

    frames: np.ndarray
    patient_key: str | None  # Patient ID (0010,0020), else Study Instance UID (0020,000D)
    modality: str  # Modality (0008,0060), "" when absent


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


class VoiOutput(NamedTuple):
    """Values after the VOI stage and the range they live in (for inversion / normalising)."""

    values: np.ndarray
    low: float
    high: float


def read_image_frames(
    path: Path, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> DicomImage:
    """Read one file and return its frames in [0, 1]; raise :class:`DicomRejected` otherwise.

    The file is opened once: the header pass and the full pass read the same handle, and the
    geometry is re-checked on the full dataset so the cap cannot be bypassed between them.
    """
    try:
        with path.open("rb") as fh:
            header = _parse(fh, stop_before_pixels=True)
            geometry, patient_key, modality = _inspect_header(header, max_decoded_bytes)
            fh.seek(0)
            ds = _parse(fh, stop_before_pixels=False)
    except OSError as exc:
        raise DicomRejected("unreadable", f"cannot read {path.name}: {exc}") from exc
    if "PixelData" not in ds:
        other = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
        hint = f" (only {other[0]}, which is not supported)" if other else ""
        raise DicomRejected("no-pixel-data", f"no Pixel Data (7FE0,0010){hint}")
    if _inspect_header(ds, max_decoded_bytes)[0] != geometry:
        raise DicomRejected("invalid-header", "Image Pixel attributes changed between reads")
    frames = to_unit_frames(decode_pixel_data(ds, geometry), ds)
    return DicomImage(frames=frames, patient_key=patient_key, modality=modality)


def _parse(fh: BinaryIO, *, stop_before_pixels: bool) -> Dataset:
    """Parse a Part 10 file (no ``force``: a file without the DICM prefix is refused)."""
    try:
        return dcmread(fh, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # the parser raises many types on hostile input
        raise DicomRejected("unreadable", f"not a readable DICOM file: {exc}") from exc


def _inspect_header(ds: Dataset, max_decoded_bytes: int) -> tuple[PixelGeometry, str | None, str]:
    """All header checks that precede decoding; malformed values become ``invalid-header``."""
    try:
        check_image_sop_class(ds)
        geometry = read_pixel_geometry(ds)
        check_photometric(geometry)
        check_decoded_size(geometry, max_decoded_bytes)
        return geometry, read_patient_key(ds), str(ds.get("Modality", "") or "").strip()
    except DicomRejected:
        raise
    except Exception as exc:  # lazily converted values can fail on access
        raise DicomRejected("invalid-header", f"malformed header value: {exc}") from exc


def _in_root(uid: str, root: str) -> bool:
    return uid == root or uid.startswith(root + ".")


def check_image_sop_class(ds: Dataset) -> None:
    """Reject objects whose SOP Class UID (0008,0016) or Modality (0008,0060) is not a picture."""
    meta = getattr(ds, "file_meta", None)
    fallback = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    sop = str(ds.get("SOPClassUID", "") or fallback).strip()
    if not sop:
        raise DicomRejected("unreadable", "no SOP Class UID (0008,0016) nor Media Storage SOP "
                            "Class UID (0002,0002): not a DICOM object")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    rt_non_image = _in_root(sop, _RT_ROOT) and not _in_root(sop, _RT_IMAGE)
    if any(_in_root(sop, root) for root in _NON_IMAGE_SOP_ROOTS) or rt_non_image:
        raise DicomRejected("not-an-image", f"SOP Class UID (0008,0016) {sop} is not an image")
    if modality in _NON_IMAGE_MODALITIES:
        raise DicomRejected("not-an-image", f"Modality (0008,0060) {modality} is not an image")
    if sop in _TILED_SOP_CLASSES:
        raise DicomRejected("unsupported-sop-class", f"SOP Class UID {sop}: whole-slide tiles")


def check_photometric(geometry: PixelGeometry) -> None:
    """Accept MONOCHROME1/2 with one sample and RGB/YBR with three (0028,0004), (0028,0002)."""
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


def read_patient_key(ds: Dataset) -> str | None:
    """Patient ID (0010,0020), else Study Instance UID (0020,000D), else None (no identity)."""
    for keyword in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return value
    return None


def decode_pixel_data(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """Decode Pixel Data (7FE0,0010) to (F, H, W) or (F, H, W, 3); YBR is returned as RGB."""
    try:
        arr = pixel_array(ds)
    except Exception as exc:  # decoders raise many types on corrupt or unsupported data
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise DicomRejected(
            "decode-failed",
            f"cannot decode pixel data ({getattr(syntax, 'name', syntax)}): {exc}; compressed "
            "syntaxes need the pylibjpeg plugins",
        ) from exc
    shape: tuple[int, ...] = (geometry.frames, geometry.rows, geometry.columns)
    if geometry.samples_per_pixel > 1:
        shape = (*shape, geometry.samples_per_pixel)
    if arr.size != int(np.prod(shape)):
        raise DicomRejected("decode-failed", f"decoded {arr.shape}, expected {shape}")
    return arr.reshape(shape)


def to_unit_frames(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Run the per-frame display pipeline on decoded pixels; returns float32 (F, H, W) in [0, 1].

    Colour rule (RGB, and YBR_* which the decoder returns as RGB): luminance
    Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, the Y row of YBR_FULL in PS3.3 C.7.6.3.1.2),
    normalised by the nominal range [0, 2**BitsStored - 1]; colour values are display values,
    so no Modality or VOI LUT applies.
    """
    out = np.empty(raw.shape[:3], dtype=np.float32)
    try:
        if raw.ndim == 4:
            high = float(2 ** int(ds.get("BitsStored", ds.BitsAllocated)) - 1)
            for i, frame in enumerate(raw):
                out[i] = normalize_to_unit_range(convert_to_luminance(frame), 0.0, high)
            return out
        monochrome1 = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"
        for i, frame in enumerate(raw):
            view = frame_transform_dataset(ds, i)
            voi = apply_voi_lut(apply_modality_lut(frame, view), view)
            values = voi.values
            if monochrome1:
                values = invert_monochrome1(values, voi.low, voi.high)
            out[i] = normalize_to_unit_range(values, voi.low, voi.high)
    except DicomRejected:
        raise
    except Exception as exc:  # malformed LUT descriptors, windows, slopes ...
        raise DicomRejected("invalid-header", f"cannot apply Modality/VOI LUT: {exc}") from exc
    return out


def frame_transform_dataset(ds: Dataset, index: int) -> Dataset:
    """The Modality/VOI attributes that apply to frame ``index``, as a small dataset.

    Enhanced multi-frame objects keep them in the Shared (5200,9229) and Per-Frame
    (5200,9230) Functional Groups: Pixel Value Transformation (0028,9145) and Frame VOI LUT
    (0028,9132). Per-frame values override shared ones, which override top-level ones.
    """
    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # endianness of OW LUT Data
    sources: list[Dataset] = [ds]
    for group_kw, item_index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", index),
    ):
        groups = ds.get(group_kw)
        if groups and len(groups) > item_index:
            for seq_kw in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
                if groups[item_index].get(seq_kw):
                    sources.append(groups[item_index].get(seq_kw)[0])
    for source in sources:
        for kw in _FRAME_TRANSFORM_KEYWORDS:
            if kw in source:
                view.add(source[kw])
    return view


def apply_modality_lut(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT Sequence (0028,3000) or Rescale Slope (0028,1053) / Intercept (0028,1052).

    Returns float64 in modality units (e.g. Hounsfield units for CT). Inputs are clipped to the
    LUT's domain first, which is the standard's rule and avoids integer wrap-around in pydicom.
    """
    values = raw.astype(np.int64) if np.issubdtype(raw.dtype, np.integer) else raw
    if ds.get("ModalityLUTSequence"):
        values = _clip_to_lut_domain(values, ds.ModalityLUTSequence[0])
    out = np.asarray(pixel_processing.apply_modality_lut(values, ds), dtype=np.float64)
    if not np.isfinite(out).all():
        raise DicomRejected("invalid-header", "Modality LUT / Rescale produced non-finite values")
    return out


def apply_voi_lut(values: np.ndarray, ds: Dataset) -> VoiOutput:
    """VOI LUT Sequence (0028,3010), else Window Center (0028,1050) / Width (0028,1051).

    Output range: the LUT's own min/max (robust to 12-bit LUTs declared as 16-bit), or the
    windowing output range. With neither present, the frame's min-max is the window.
    """
    if ds.get("VOILUTSequence"):
        table, first_map = voi_lut_table(ds)
        index = _clip_to_lut_domain(np.rint(values), ds.VOILUTSequence[0]) - first_map
        return VoiOutput(table[index], float(table.min()), float(table.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # Probing with -inf/+inf reads pydicom's own output range [y_min, y_max] exactly.
        low, high = pixel_processing.apply_windowing(np.array([-np.inf, np.inf]), ds)
        return VoiOutput(pixel_processing.apply_windowing(values, ds), float(low), float(high))
    return VoiOutput(values, float(values.min()), float(values.max()))


def voi_lut_table(ds: Dataset) -> tuple[np.ndarray, int]:
    """VOI LUT Sequence item 0 evaluated by pydicom over its whole domain, and First Mapped.

    pydicom 3.0.2 indexes with the entry dtype, so an 8-bit LUT with more than 256 entries
    wraps around; such a LUT is evaluated through a copy declaring 16-bit entries (the entry
    values are the same integers).
    """
    item = ds.VOILUTSequence[0]
    nr_entries, first_map, depth = (int(v) for v in item.LUTDescriptor)
    nr_entries = nr_entries or 2**16
    source = ds
    if depth == 8 and nr_entries > 256:
        widened = Dataset()
        widened.LUTDescriptor = [nr_entries, first_map, 16]
        widened.add(item["LUTData"])
        source = Dataset()
        if hasattr(ds, "file_meta"):
            source.file_meta = ds.file_meta
        source.VOILUTSequence = [widened]
    domain = np.arange(first_map, first_map + nr_entries, dtype=np.int64)
    table = np.asarray(pixel_processing.apply_voi(domain, source), dtype=np.float64)
    return table, first_map


def _clip_to_lut_domain(values: np.ndarray, item: Dataset) -> np.ndarray:
    """Clip to [first mapped, first mapped + entries - 1] from LUT Descriptor (0028,3002)."""
    nr_entries, first_map = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    return np.clip(values.astype(np.int64), first_map, first_map + nr_entries - 1)


def invert_monochrome1(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """MONOCHROME1 (0028,0004): minimum value is white; mirror within [low, high]."""
    return (high + low) - values


def convert_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) float64 luma with ITU-R BT.601 weights."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    return rgb.astype(np.float64) @ weights


def normalize_to_unit_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 1] as float32; a constant frame maps to 0."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = (values.astype(np.float64) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
