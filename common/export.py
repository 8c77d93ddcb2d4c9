"""Export synthetic images as PNG, NPZ or DICOM, always with a provenance sidecar.

Every export folder holds ``medsynth_export.json``: the model's content hash and round, how the
run's model started (the random seed, or the public checkpoint it was initialised from), the
run, and the (ε, δ) of every hospital that trained the model, so whoever receives the images
can tell what produced them and under which privacy guarantee. Images are post-processing of
the DP generator; the export touches no patient data.

DICOM output is Secondary Capture (PS3.3 A.8.1) and says it is synthetic everywhere a viewer
or a PACS looks: Conversion Type ``SYN`` (synthetic image), Image Type
``DERIVED\\SECONDARY\\SYNTHETIC``, a Series Description and Image Comments saying so, Patient
Name/ID ``SYNTHETIC`` (no attribute of any real patient), fresh random UIDs for study, series
and every instance, no dates. Labels are written as the sub-folder name (``<out>/<class>/``),
the layout ``medsynth node prepare`` reads. The mask of a pair is also a DICOM SEG (BINARY, one
segment) beside its image, in the image's study, in a series of its own, referencing the image by
SOP Instance UID and carrying the same markers (:func:`mark_synthetic`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from common.atomic import write_json_atomic
from common.errors import UserError
from common.pairs import MASK_CHANNEL, MASK_SEGMENT_LABEL, binary_masks, mask_rel
from common.round_record import NOT_RECORDED, Initialisation, RoundRecord, SitePrivacyReport, latest_privacy

if TYPE_CHECKING:  # pydicom and Pillow are imported by the functions that write files, so that a
    # command's help page (``medsynth sample --help`` names FORMATS and SIDECAR) starts without them
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

SIDECAR = "medsynth_export.json"
ExportFormat = Literal["png", "npz", "dicom"]
FORMATS: tuple[ExportFormat, ...] = ("png", "npz", "dicom")
SERIES_DESCRIPTION = "SYNTHETIC - medsynth DP-GAN - not a patient"
SYNTHETIC_PATIENT = "SYNTHETIC^"  # Patient Name (0010,0010): family name SYNTHETIC, no given name
SEG_SUFFIX = ".seg.dcm"  # the DICOM SEG of <name>.dcm is <name>.seg.dcm, beside it
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class ExportError(UserError, ValueError):
    """An export cannot be written as asked (bad format, bad folder, class unknown)."""


@dataclass(frozen=True)
class SitePrivacy:
    """One hospital's cumulative (ε, δ) as it reported it, recomputed from its own ledger."""

    epsilon: float
    delta: float
    epsilon_budget: float
    steps: int


@dataclass(frozen=True)
class Provenance:
    """What made the images: model hash and config, checkpoint round, how the model started, run,
    per-hospital privacy."""

    model_sha256: str
    checkpoint: str
    round: int
    run_id: int | None
    model_config: Mapping[str, Any]
    class_names: tuple[str, ...]
    sites: Mapping[str, SitePrivacy]
    secure_aggregation: bool | None = None
    initialisation: Initialisation = NOT_RECORDED

    def to_json(self) -> dict[str, Any]:
        eps = [s.epsilon for s in self.sites.values()]
        return {
            "model": {"content_sha256": self.model_sha256, "checkpoint": self.checkpoint, "round": self.round,
                      "config": dict(self.model_config), "class_names": list(self.class_names),
                      "initialisation": {**self.initialisation.to_json(),
                                         "description": self.initialisation.describe()}},
            "run": {"run_id": self.run_id, "secure_aggregation": self.secure_aggregation},
            "privacy": {
                "unit": "patient",
                "source": "each hospital's report in the checkpoint's round history, recomputed from its ledger",
                "sites": {k: asdict(v) for k, v in sorted(self.sites.items())},
                "max_epsilon": max(eps) if eps else None,
            },
        }


def privacy_from_history(history: Sequence[RoundRecord]) -> dict[str, SitePrivacy]:
    """Latest (ε, δ) of every hospital that trained in any round of a checkpoint's history."""
    return privacy_from_reports(latest_privacy(history))


def privacy_from_reports(reports: Mapping[str, SitePrivacyReport]) -> dict[str, SitePrivacy]:
    """(ε, δ, budget, steps) of each hospital's privacy report."""
    return {site: SitePrivacy(p.epsilon, p.delta, p.epsilon_budget, p.steps) for site, p in reports.items()}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, S, S) or (N, 1, S, S) in [-1, 1] → uint8 (N, S, S)."""
    arr = images[:, 0] if images.ndim == 4 else images
    return np.clip((arr + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def _class_folder(name: str) -> str:
    return _SAFE.sub("_", name).strip("._") or "class"


def secondary_capture(sop_uid: UID) -> Dataset:
    """An empty Secondary Capture Image Storage instance (PS3.3 A.8.1), explicit VR little endian.

    File meta (0002,0002)/(0002,0003)/(0002,0010) and SOP Class/Instance UID (0008,0016)/(0008,0018);
    the caller adds patient, study, series and pixel attributes.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    return ds


def mark_synthetic(ds: Dataset, *, comment: str, provenance: Provenance) -> None:
    """The markers every exported object carries (image and SEG alike): the series and image say
    synthetic, the patient is ``SYNTHETIC`` with no attribute of a real one, the derivation names
    the model. The one place these markers are written."""
    ds.PatientName, ds.PatientID = SYNTHETIC_PATIENT, "SYNTHETIC"
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.AccessionNumber = "", "", "", ""
    ds.StudyID = "SYNTH"
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ImageComments = f"{comment}; not a real patient"
    ds.DerivationDescription = (
        f"generated by a differentially private GAN (medsynth), model sha256 {provenance.model_sha256[:16]}, "
        f"round {provenance.round}; see {SIDECAR}"
    )
    ds.Manufacturer, ds.BurnedInAnnotation = "medsynth", "NO"


def synthetic_dicom(pixels: np.ndarray, *, label: str, study_uid: str, series_uid: str, number: int,
                    provenance: Provenance) -> Dataset:
    """One uint8 (S, S) image as a Secondary Capture dataset carrying the synthetic markers."""
    from pydicom.uid import generate_uid

    ds = secondary_capture(generate_uid())
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    mark_synthetic(ds, comment=f"synthetic image, class {label}", provenance=provenance)
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2", 8, generate_instance_uid=False)
    return ds


def synthetic_segmentation(image: Dataset, mask: np.ndarray, *, series_uid: str, number: int,
                           provenance: Provenance) -> Dataset:
    """The DICOM SEG (PS3.3 A.51, BINARY, one segment :data:`common.pairs.MASK_SEGMENT_LABEL`) of the
    synthetic ``image``: the mask bool (S, S) on its pixel grid, referencing its SOP Instance UID, in its
    study, in the SEG series ``series_uid``, marked synthetic as the image is (:func:`mark_synthetic`).
    """
    from highdicom import AlgorithmIdentificationSequence
    from highdicom.seg import SegmentAlgorithmTypeValues, Segmentation, SegmentationTypeValues, SegmentDescription
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    version = f"sha256 {provenance.model_sha256[:16]}, round {provenance.round}"
    segment = SegmentDescription(
        segment_number=1, segment_label=MASK_SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=AlgorithmIdentificationSequence(
            name="medsynth DP-GAN", family=codes.cid7162.ArtificialIntelligence, version=version),
    )
    seg = Segmentation(
        source_images=[image], pixel_array=np.asarray(mask, dtype=bool)[None],  # (1, S, S)
        segmentation_type=SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=series_uid, series_number=2, sop_instance_uid=generate_uid(), instance_number=number,
        manufacturer="medsynth", manufacturer_model_name="medsynth DP-GAN", software_versions=version,
        device_serial_number="none", omit_empty_frames=False,
    )
    mark_synthetic(seg, comment="synthetic lesion mask of a synthetic image", provenance=provenance)
    return seg


def export_images(
    images: np.ndarray,
    labels: np.ndarray,
    out: Path,
    fmt: ExportFormat,
    provenance: Provenance,
    *,
    sampling: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write images (N, [1,] S, S) in [-1, 1] with class labels (N,) to ``out`` and the sidecar.

    Pairs (N, 2, S, S) of a pair model (``common.pairs``) are written with their masks: NPZ gains
    ``masks`` uint8 (N, S, S) in {0, 1}; PNG and DICOM write each mask as the PNG
    ``masks/<class>/synthetic_<k>.png`` (0 / 255) beside its image, the layout ``node prepare --pairs``
    reads; DICOM also writes it as a DICOM SEG ``<class>/synthetic_<k>.seg.dcm`` referencing the image
    (:func:`synthetic_segmentation`). Returns the written image (and mask) files (the sidecar is
    ``out / SIDECAR``). Refuses a non-empty ``out`` that already holds an export, so two exports never
    mix under one sidecar.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if labels.shape != (images.shape[0],):
        raise ExportError(f"labels ({labels.shape}) must match images ({images.shape[0]})")
    if (out / SIDECAR).exists():
        raise ExportError(f"{out} already holds an export ({SIDECAR}); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    pairs = images.ndim == 4 and images.shape[1] == 2
    masks = binary_masks(images[:, MASK_CHANNEL]).astype(np.uint8) if pairs else None  # (N, S, S) in {0, 1}
    names = provenance.class_names
    files: list[Path] = []
    if fmt == "npz":
        path = out / "synthetic.npz"
        arrays: dict[str, np.ndarray] = {"images": pixels, "labels": labels.astype(np.int64),
                                         "class_names": np.array(names, dtype=np.str_)}
        if masks is not None:
            arrays["masks"] = masks
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        files.append(path)
    else:
        from PIL import Image
        from pydicom.uid import generate_uid

        study_uid, series_uid, seg_series_uid = generate_uid(), generate_uid(), generate_uid()
        for k, (img, label) in enumerate(zip(pixels, labels, strict=True)):
            folder = out / _class_folder(names[int(label)])
            folder.mkdir(exist_ok=True)
            if fmt == "png":
                path = folder / f"synthetic_{k:06d}.png"
                Image.fromarray(img).save(path, format="PNG")
            else:
                path = folder / f"synthetic_{k:06d}.dcm"
                ds = synthetic_dicom(img, label=names[int(label)], study_uid=study_uid, series_uid=series_uid,
                                     number=k + 1, provenance=provenance)
                ds.save_as(path, enforce_file_format=True)
                if masks is not None:  # the pair's mask as a DICOM SEG naming this image, beside it
                    seg_path = path.with_name(path.stem + SEG_SUFFIX)
                    synthetic_segmentation(ds, masks[k], series_uid=seg_series_uid, number=k + 1,
                                           provenance=provenance).save_as(seg_path, enforce_file_format=True)
                    files.append(seg_path)
            files.append(path)
            if masks is not None:  # the pair's mask, where node prepare --pairs looks for it
                mask_path = out / mask_rel(path.relative_to(out).as_posix())
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks[k] * np.uint8(255)).save(mask_path, format="PNG")
                files.append(mask_path)
    sidecar = {
        "synthetic": True,
        "notice": "synthetic images generated by a differentially private GAN; no image shows a real patient",
        "format": fmt,
        "pairs": masks is not None,
        "count": int(images.shape[0]),
        "class_counts": {names[c]: int((labels == c).sum()) for c in range(len(names))},
        "files": [str(p.relative_to(out)) for p in files],
        "sampling": dict(sampling or {}),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **provenance.to_json(),
    }
    write_json_atomic(out / SIDECAR, sidecar)
    return files
