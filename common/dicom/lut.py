"""The greyscale display pipeline of PS3.4 N.2.1.1, frame by frame, ending in [0, 1].

    Modality LUT -> VOI LUT / windowing (or the modality's default) -> MONOCHROME1 inversion
    -> normalise to [0, 1]

Colour rule: RGB and YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT (which the decoders return as
RGB) become luminance Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, the Y row of YBR_FULL in
PS3.3 C.7.6.3.1.2), normalised by the nominal range [0, 2**BitsStored - 1]. PALETTE COLOR is
rejected before decoding (common.dicom.read): palette indices are not intensities.

Default window when a greyscale frame has neither VOI LUT Sequence (0028,3010) nor Window Center
/ Width (0028,1050)/(0028,1051): :data:`DEFAULT_WINDOWS` where the values after the Modality LUT
are in the modality's calibrated unit, which for CT means Hounsfield units: a CT image storage
SOP Class (0008,0016) with Rescale Slope (0028,1053) and Intercept (0028,1052) (:func:`
is_hounsfield`). Anything else, including Modality CT on a Secondary Capture (scanned film) or
an 8-bit CT without a rescale, gets the frame's own range, as MR, US, CR, DX ... always do.

Attributes that mean "nothing" are treated as absent, with a warning recorded for the file:
a Window Width of 0 or less (MR series carry Window Center = Width = 0 for "no window") and a
Modality LUT Sequence (0028,3000) or VOI LUT Sequence (0028,3010) whose item is empty.
Presentation LUTs (2050,0010)/(2050,0020) are ignored: training needs a consistent grey scale,
not a particular softcopy presentation.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import processing as pixel_processing

from common.dicom.errors import DicomRejected

# Modality (0008,0060) -> (Window Center, Window Width) in modality units, applied as a LINEAR
# window (PS3.3 C.11.2.1.2.1) only where the values are in that unit (see is_hounsfield).
# CT: the soft-tissue window W 400 / L 40 HU.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {"CT": (40.0, 400.0)}

# SOP Class UIDs (0008,0016) whose stored values, after Rescale Slope/Intercept, are Hounsfield
# units: CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image Storage (PS3.3 C.8.2.1,
# C.8.15.3.9.1).
CT_HOUNSFIELD_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                                       "1.2.840.10008.5.1.4.1.1.2.2"})

# Modality and VOI attributes copied into a per-frame view (see frame_transform_dataset).
_FRAME_TRANSFORM_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "VOILUTSequence",
)


class VoiOutput(NamedTuple):
    """Values after the VOI stage and the range they live in (for inversion / normalising)."""

    values: np.ndarray
    low: float
    high: float


def to_unit_frames(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Run the per-frame display pipeline on decoded pixels; returns float32 (F, H, W) in [0, 1].

    ``raw`` is (F, H, W) greyscale or (F, H, W, 3) RGB; colour follows the module's colour rule
    (colour values are display values, so no Modality or VOI LUT applies).
    """
    out = np.empty(raw.shape[:3], dtype=np.float32)
    try:
        if raw.ndim == 4:
            high = float(2 ** int(ds.get("BitsStored", ds.BitsAllocated)) - 1)
            for i, frame in enumerate(raw):
                out[i] = normalize_to_unit_range(convert_to_luminance(frame), 0.0, high)
            return out
        monochrome1 = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"
        modality = str(ds.get("Modality", "") or "").strip().upper()
        for i, frame in enumerate(raw):
            view = frame_transform_dataset(ds, i)
            default = DEFAULT_WINDOWS.get(modality) if is_hounsfield(ds, view) else None
            voi = apply_voi_lut(apply_modality_lut(frame, view), view, default)
            values = voi.values
            if monochrome1:
                values = invert_monochrome1(values, voi.low, voi.high)
            out[i] = normalize_to_unit_range(values, voi.low, voi.high)
    except (DicomRejected, MemoryError):
        raise
    except Exception as exc:  # pydicom on malformed LUT descriptors, windows, slopes ...
        raise DicomRejected("invalid-header", f"cannot apply Modality/VOI LUT: {exc}") from exc
    return out


def frame_transform_dataset(ds: Dataset, index: int) -> Dataset:
    """The Modality/VOI attributes that apply to frame ``index``, as a small dataset.

    Enhanced multi-frame objects keep them in the Shared (5200,9229) and Per-Frame
    (5200,9230) Functional Groups: Pixel Value Transformation (0028,9145) and Frame VOI LUT
    (0028,9132). Per-frame values override shared ones, which override top-level ones. What
    means "nothing" is left out with a warning (:func:`drop_empty_transforms`).
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
    drop_empty_transforms(view)
    return view


def drop_empty_transforms(view: Dataset) -> None:
    """Remove, with a warning, the transform attributes of ``view`` that mean "none".

    * Modality LUT Sequence (0028,3000) / VOI LUT Sequence (0028,3010) whose first item holds
      neither LUT Descriptor (0028,3002) nor LUT Data (0028,3006): no LUT (pydicom 3.0.2 fails
      on it with a TypeError);
    * Window Width (0028,1051) of 0 or less: no window. MR series carry Window Center = Width
      = 0; PS3.3 C.11.2.1.2.1 requires a width >= 1 (LINEAR) or > 0 (LINEAR_EXACT), and
      pydicom refuses anything else. Window Center (0028,1050) and the VOI LUT Function
      (0028,1056) go with it.
    """
    for keyword, tag in (("ModalityLUTSequence", "(0028,3000)"), ("VOILUTSequence", "(0028,3010)")):
        items = view.get(keyword)
        if items is not None and (len(items) == 0 or not any(
                kw in items[0] for kw in ("LUTDescriptor", "LUTData"))):
            del view[keyword]
            warnings.warn(f"{keyword} {tag} holds no LUT (an empty item): treated as absent",
                          stacklevel=2)
    width = view.get("WindowWidth")
    if width is None:
        return
    first = width[0] if isinstance(width, MultiValue) and len(width) else width
    try:
        number = float(first)
    except (TypeError, ValueError):
        return  # not a number: pydicom's error names it (invalid-header)
    if number <= 0:
        for keyword in ("WindowWidth", "WindowCenter", "VOILUTFunction"):
            if keyword in view:
                del view[keyword]
        warnings.warn(f"Window Width (0028,1051) is {number:g}, which means no window: the "
                      "frame's range is used instead", stacklevel=2)


def is_hounsfield(ds: Dataset, view: Dataset) -> bool:
    """Whether a frame's values after the Modality LUT are Hounsfield units.

    True for a CT image storage SOP Class UID (0008,0016) (:data:`CT_HOUNSFIELD_SOP_CLASSES`)
    whose frame has Rescale Slope (0028,1053) and Rescale Intercept (0028,1052), with Rescale
    Type (0028,1054) absent or HU, or a Modality LUT Sequence (0028,3000) of Modality LUT Type
    (0028,3004) HU. A Secondary Capture with Modality CT (a scanned film) or a CT without a
    rescale holds display values, not HU.
    """
    meta = getattr(ds, "file_meta", None)
    fallback = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    sop = str(ds.get("SOPClassUID", "") or fallback).strip()
    if sop not in CT_HOUNSFIELD_SOP_CLASSES:
        return False
    if view.get("ModalityLUTSequence"):
        return str(view.ModalityLUTSequence[0].get("ModalityLUTType", "") or "").strip().upper() == "HU"
    if view.get("RescaleSlope") is None or view.get("RescaleIntercept") is None:
        return False
    return str(view.get("RescaleType", "") or "HU").strip().upper() == "HU"


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


def apply_voi_lut(values: np.ndarray, ds: Dataset,
                  default: tuple[float, float] | None = None) -> VoiOutput:
    """VOI LUT Sequence (0028,3010), else Window Center (0028,1050) / Width (0028,1051), else
    the ``default`` (center, width) window, else the frame's range (:func:`apply_default_window`).

    Output range: the LUT's own min/max (robust to 12-bit LUTs declared as 16-bit), or the
    windowing output range.
    """
    if ds.get("VOILUTSequence"):
        table, first_map = voi_lut_table(ds)
        index = _clip_to_lut_domain(np.rint(values), ds.VOILUTSequence[0]) - first_map
        return VoiOutput(table[index], float(table.min()), float(table.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # Probing with -inf/+inf reads pydicom's own output range [y_min, y_max] exactly.
        low, high = pixel_processing.apply_windowing(np.array([-np.inf, np.inf]), ds)
        return VoiOutput(pixel_processing.apply_windowing(values, ds), float(low), float(high))
    return apply_default_window(values, default)


def apply_default_window(values: np.ndarray, default: tuple[float, float] | None) -> VoiOutput:
    """The window for a frame without VOI attributes: ``default`` (center, width), else min-max.

    A LINEAR window (PS3.3 C.11.2.1.2.1) with centre c and width w maps x to
    ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1].
    """
    if default is not None:
        center, width = default
        scaled = (values.astype(np.float64) - (center - 0.5)) / (width - 1.0) + 0.5
        return VoiOutput(np.clip(scaled, 0.0, 1.0), 0.0, 1.0)
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
