"""Simulated hospitals: split a source population by patient and write each site as DICOM.

A patient is never split across sites (the privacy unit is the patient). ``iid`` deals
shuffled patients round-robin, class after class, so every site gets the global label mix and
the same patient count (to within one); ``dirichlet:ALPHA`` gives label skew: for each class c a
proportion vector p_c ~ Dirichlet(ALPHA, ..., ALPHA) over sites, and that class's patients
(labelled by their majority image label) are dealt to sites by a multinomial draw with p_c.
Small ALPHA -> each class concentrates on few sites.

Non-empty sites are guaranteed by a seeded repair after the draw: while some site has
fewer than ``min_patients_per_site`` patients, one patient moves to it from the site that has
the most (taken from that site's most common class, so the skew is disturbed least). Because
``n_patients >= n_sites * min_patients_per_site`` is checked first, the donor always keeps at
least the minimum, and the loop ends after at most ``n_sites * min_patients_per_site`` moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from common.errors import UserError
from common.export import secondary_capture
from common.pairs import MASKS_FOLDER, mask_rel

# BT.601 luma, the same rule as common.dicom.read for colour DICOM.
_LUMA = np.array([0.299, 0.587, 0.114])
_MEDMNIST_CLASSES = {"pneumoniamnist": ("normal", "pneumonia"), "hc18-28": ("small-head", "large-head")}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SourceDataError(UserError, ValueError):
    """Source arrays or a source file do not have the expected shape or content."""


class PartitionError(UserError, ValueError):
    """A partition scheme string is malformed, or the split is infeasible."""


@dataclass(frozen=True)
class ValueMapping:
    """How stored values are meant to be read, written as DICOM attributes.

    Modality (0008,0060); Rescale Slope (0028,1053) / Intercept (0028,1052) map stored values
    to physical units (e.g. HU); Window Center (0028,1050) / Width (0028,1051) the display.
    """

    modality: str = "OT"
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    window_center: float | None = None
    window_width: float | None = None


@dataclass(frozen=True, eq=False)
class SourceData:
    """A labelled image population: images (N, H, W) uint8/uint16, labels int64 (N,).

    ``patient_ids`` is a str array (N,) or None when the source has no patient identity (then
    every image is its own patient). ``masks``: uint8 (N, H, W) in {0, 1}, one segmentation mask
    per image (1 = foreground), or None when the source has none.
    """

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray | None
    class_names: tuple[str, ...]
    mapping: ValueMapping = field(default_factory=ValueMapping)
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0] if self.images.ndim == 3 else -1
        if n < 1 or self.images.dtype not in (np.uint8, np.uint16):
            raise SourceDataError(f"images must be uint8/uint16 (N, H, W), got "
                                  f"{self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (n,):
            raise SourceDataError(f"labels must be int64 ({n},), got {self.labels.dtype} "
                                  f"{self.labels.shape}")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise SourceDataError(f"labels must lie in [0, {len(self.class_names)})")
        ids = self.patient_ids
        if ids is not None and (ids.dtype.kind != "U" or ids.shape != (n,) or (ids == "").any()):
            raise SourceDataError(f"patient_ids must be non-empty str ({n},) or None")
        masks = self.masks
        if masks is not None and (masks.dtype != np.uint8 or masks.shape != self.images.shape or masks.max() > 1):
            raise SourceDataError(f"masks must be uint8 {self.images.shape} in {{0, 1}}, got {masks.dtype} "
                                  f"{masks.shape}")

    def subset(self, indices: np.ndarray) -> SourceData:
        """The images ``indices`` (and their labels, patient ids and masks)."""
        return SourceData(images=self.images[indices], labels=self.labels[indices],
                          patient_ids=None if self.patient_ids is None else self.patient_ids[indices],
                          class_names=self.class_names, mapping=self.mapping,
                          masks=None if self.masks is None else self.masks[indices])

    def patient_index(self) -> tuple[np.ndarray, int]:
        """(patient index per image in [0, P), P); each image is a patient without ids."""
        if self.patient_ids is None:
            n = self.images.shape[0]
            return np.arange(n, dtype=np.int64), n
        _, inverse = np.unique(self.patient_ids, return_inverse=True)
        inverse = inverse.astype(np.int64).reshape(-1)
        return inverse, int(inverse.max()) + 1


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # "iid" or "dirichlet"
    alpha: float | None = None


def parse_partition(scheme: str) -> PartitionScheme:
    """``"iid"`` or ``"dirichlet:ALPHA"`` with ALPHA a finite number > 0."""
    text = scheme.strip().lower()
    if text == "iid":
        return PartitionScheme("iid")
    kind, sep, value = text.partition(":")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if np.isfinite(alpha) and alpha > 0:
            return PartitionScheme("dirichlet", alpha)
    raise PartitionError(f"bad partition {scheme!r}: use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 "
                         "(e.g. 'dirichlet:0.5'; smaller ALPHA = stronger label skew)")


def split_by_patient(source: SourceData, n_sites: int, scheme: str, seed: int, *,
                     min_patients_per_site: int = 1) -> list[np.ndarray]:
    """Image indices (sorted int64) per site; every image exactly once, patients never split."""
    parsed = parse_partition(scheme)
    patient_of, n_patients = source.patient_index()
    if n_sites < 1 or min_patients_per_site < 1:
        raise PartitionError(f"need n_sites >= 1 and min_patients_per_site >= 1, got {n_sites}, "
                             f"{min_patients_per_site}")
    if n_patients < n_sites * min_patients_per_site:
        raise PartitionError(f"{n_patients} patients cannot give {n_sites} sites "
                             f"{min_patients_per_site} patient(s) each; use fewer sites")
    rng = np.random.default_rng(seed)
    n_classes = len(source.class_names)
    per_patient = np.zeros((n_patients, n_classes), dtype=np.int64)
    np.add.at(per_patient, (patient_of, source.labels), 1)
    patient_label = per_patient.argmax(axis=1)  # majority label, ties -> lowest class index
    site_of = np.empty(n_patients, dtype=np.int64)
    if parsed.kind == "iid":  # stratified: each class dealt round-robin, one running counter
        order = np.concatenate([rng.permutation(np.flatnonzero(patient_label == c))
                                for c in range(n_classes)])
        site_of[order] = (int(rng.integers(n_sites)) + np.arange(n_patients)) % n_sites
    else:
        alpha = float(parsed.alpha or 0.0)
        for c in range(n_classes):
            members = rng.permutation(np.flatnonzero(patient_label == c))
            counts = rng.multinomial(members.size, rng.dirichlet(np.full(n_sites, alpha)))
            site_of[members] = np.repeat(np.arange(n_sites), counts)
        _ensure_min_patients(site_of, patient_label, n_sites, min_patients_per_site, rng)
    image_site = site_of[patient_of]
    return [np.flatnonzero(image_site == s).astype(np.int64) for s in range(n_sites)]


def _ensure_min_patients(site_of: np.ndarray, patient_label: np.ndarray, n_sites: int,
                         minimum: int, rng: np.random.Generator) -> None:
    """Move patients from the largest site to any site below ``minimum`` (in place)."""
    while True:
        sizes = np.bincount(site_of, minlength=n_sites)
        short = np.flatnonzero(sizes < minimum)
        if short.size == 0:
            return
        donor = int(sizes.argmax())  # sizes.sum() >= n_sites * minimum, so sizes[donor] > minimum
        donor_patients = np.flatnonzero(site_of == donor)
        common = np.bincount(patient_label[donor_patients]).argmax()
        candidates = donor_patients[patient_label[donor_patients] == common]
        site_of[rng.choice(candidates)] = int(short[0])


def load_medmnist_npz(path: Path, split: str = "train",
                      class_names: tuple[str, ...] | None = None) -> SourceData:
    """A MedMNIST v2 ``.npz`` split as SourceData (no patient ids in MedMNIST: None).

    Colour datasets (N, H, W, 3) are reduced to BT.601 luma. Multi-label datasets are refused.
    """
    if split not in ("train", "val", "test"):
        raise SourceDataError(f"split must be 'train', 'val' or 'test', got {split!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise SourceDataError(f"cannot read MedMNIST split {split!r} from {path}: {exc}") from exc
    if images.ndim == 4 and images.shape[-1] == 3:
        images = np.clip(np.rint(images.astype(np.float64) @ _LUMA), 0, 255).astype(np.uint8)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise SourceDataError(f"{path.name} is multi-label ({labels.shape[1]} labels); "
                              "only single-label MedMNIST datasets are supported")
    labels = labels.reshape(-1).astype(np.int64)
    if class_names is None:
        default = tuple(f"class{i}" for i in range(int(labels.max()) + 1))
        class_names = _MEDMNIST_CLASSES.get(path.stem, default)
    return SourceData(images=images.astype(np.uint8), labels=labels, patient_ids=None,
                      class_names=class_names)


def write_site_dicom(source: SourceData, indices: np.ndarray, out_dir: Path, *, site_name: str,
                     seed: int, masks: bool = False) -> int:
    """Write ``source.images[indices]`` as Secondary Capture files ``out_dir/<class>/<n>.dcm``.

    ``masks``: also write each image's mask as ``out_dir/masks/<class>/<n>.png`` (8-bit, 0 or
    255), the layout ``node prepare`` pairs in pair mode (``model.pairs``); the source must have
    masks.

    Explicit VR Little Endian with a proper File Meta group, MONOCHROME2, UIDs from
    ``generate_uid`` seeded by (seed, site, image), so the same call writes the same files.
    Patient ID (0010,0020) and Study Instance UID (0020,000D) are written only when the source
    has patient ids: without them the loader must see no patient identity, so the study UID
    (which it would fall back on) is deliberately left out. File names carry no identifiers.
    """
    if not _SAFE_NAME.match(site_name):
        raise SourceDataError(f"site_name {site_name!r} must match {_SAFE_NAME.pattern}")
    for name in source.class_names:
        if not _SAFE_NAME.match(name):
            raise SourceDataError(f"class name {name!r} is not a safe folder name")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= source.images.shape[0]):
        raise SourceDataError(f"indices out of range [0, {source.images.shape[0]})")
    if masks and source.masks is None:
        raise SourceDataError("image–mask pairs asked for (--pairs, model.pairs), but this source has no masks: "
                              "use the phantoms, or a data set with masks")
    for name in source.class_names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        if masks:
            (out_dir / MASKS_FOLDER / name).mkdir(parents=True, exist_ok=True)
    # Bits Stored (0028,0101): 8 for uint8; 12 (CT-like) when uint16 values fit, else 16.
    bits = 8 if source.images.dtype == np.uint8 else (12 if source.images.max() < 4096 else 16)
    for k, idx in enumerate(indices.tolist()):
        ds = _secondary_capture(source, idx, site_name, seed, bits)
        rel = Path(source.class_names[int(source.labels[idx])]) / f"{site_name}_{k:06d}.dcm"
        ds.save_as(out_dir / rel, enforce_file_format=True)
        if masks and source.masks is not None:
            Image.fromarray(source.masks[idx] * np.uint8(255)).save(out_dir / mask_rel(rel.as_posix()), format="PNG")
    return int(indices.size)


def _uid(seed: int, site_name: str, *parts: str) -> UID:
    return generate_uid(entropy_srcs=["medsynth", str(seed), site_name, *parts])


def _secondary_capture(source: SourceData, idx: int, site_name: str, seed: int,
                       bits_stored: int) -> Dataset:
    """One image as a Secondary Capture Image Storage dataset."""
    pixels = source.images[idx]
    ds = secondary_capture(_uid(seed, site_name, "sop", str(idx)))
    ds.Modality = source.mapping.modality
    ds.ConversionType = "SYN"  # synthetic image, Secondary Capture module
    if source.patient_ids is not None:
        patient = str(source.patient_ids[idx])
        ds.PatientID = patient
        ds.StudyInstanceUID = _uid(seed, site_name, "study", patient)
        ds.SeriesInstanceUID = _uid(seed, site_name, "series", patient)
    else:
        ds.SeriesInstanceUID = _uid(seed, site_name, "series", str(idx))
    ds.InstanceNumber = idx + 1
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2", bits_stored,
                      generate_instance_uid=False)
    m = source.mapping
    if m.rescale_slope is not None and m.rescale_intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{m.rescale_slope:g}", f"{m.rescale_intercept:g}"
    if m.window_center is not None and m.window_width is not None:
        ds.WindowCenter, ds.WindowWidth = f"{m.window_center:g}", f"{m.window_width:g}"
    return ds
