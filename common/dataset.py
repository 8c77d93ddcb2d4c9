"""The prepared local cache: pixels, labels and salted patient indices, pickle-free.

``client.prepare.pipeline`` turns a hospital's DICOM folder into one ``.npz`` file; training only ever
reads that file through :func:`load_cache`. The cache holds nothing from the DICOM headers
but the label and a salted patient hash (no Patient ID, no UIDs, no dates).

Layout of ``<cache_dir>/dataset.npz`` (``np.savez``, loaded with ``allow_pickle=False``):
``images`` float32 (N, C, S, S) in [-1, 1], C = 1, or C = 2 for image–mask pairs (``model.pairs``:
channel 1 is the mask in {-1, 1}, ``common.pairs``); ``labels`` int64 (N,); ``patients`` int64 (N,);
``class_names`` unicode (C,); ``patient_hashes`` unicode (P,) hex SHA-256; ``patient_identity``
bool (); ``fingerprint`` unicode (); ``format_version`` int64 ().
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.atomic import fsync_dir
from common.errors import UserError

CACHE_FILE = "dataset.npz"
FORMAT_VERSION = 1
_KEYS = ("images", "labels", "patients", "class_names", "patient_hashes", "patient_identity",
         "fingerprint", "format_version")


class DatasetError(UserError):
    """The local dataset or its cache is missing, corrupt or inconsistent."""


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """One site's training data, ready for the patient-level sampler.

    ``patients[i]`` is the index in [0, P) of the privacy unit (patient) of image ``i``; every
    index in [0, P) has at least one image. With ``patient_identity`` False some files carried
    no Patient ID (0010,0020) and could not be linked to one through their Study Instance UID
    (0020,000D): their unit is a study, or a single file, so for them the privacy unit degrades
    from the patient to the study or the file.
    """

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    class_names: tuple[str, ...]
    patient_identity: bool

    def __post_init__(self) -> None:
        images, labels, patients = self.images, self.labels, self.patients
        if images.dtype != np.float32 or images.ndim != 4 or images.shape[1] not in (1, 2):
            raise DatasetError(f"images must be float32 (N, 1, S, S), or (N, 2, S, S) for image–mask "
                               f"pairs, got {images.dtype} {images.shape}")
        if images.shape[2] != images.shape[3] or images.shape[0] == 0:
            raise DatasetError(f"images must be square and non-empty, got {images.shape}")
        if not (np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0):
            raise DatasetError("images must be finite and within [-1, 1]")
        n = images.shape[0]
        for name, arr in (("labels", labels), ("patients", patients)):
            if arr.dtype != np.int64 or arr.shape != (n,):
                raise DatasetError(f"{name} must be int64 ({n},), got {arr.dtype} {arr.shape}")
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise DatasetError(f"class_names must be non-empty and unique: {self.class_names}")
        if labels.min() < 0 or labels.max() >= len(self.class_names):
            raise DatasetError(f"labels must lie in [0, {len(self.class_names)})")
        if patients.min() < 0 or np.unique(patients).size != int(patients.max()) + 1:
            raise DatasetError("patients must use every index in [0, P) at least once")
        if not isinstance(self.patient_identity, bool):
            raise DatasetError("patient_identity must be a bool")

    @property
    def num_patients(self) -> int:
        """P, the number of distinct patients (the privacy unit)."""
        return int(self.patients.max()) + 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def pairs(self) -> bool:
        """Whether each row is an image–mask pair (channel 1 the mask, ``common.pairs``)."""
        return int(self.images.shape[1]) == 2


def save_cache(ds: LocalDataset, cache_dir: Path, fingerprint: str, patient_hashes: np.ndarray) -> Path:
    """Write ``dataset.npz`` atomically (temp file, fsync, ``os.replace``, fsync of the folder).

    ``patient_hashes[p]`` is the salted hash of patient ``p``; it lets a later run recognise
    the same patient without ever storing the Patient ID.
    """
    if patient_hashes.shape != (ds.num_patients,) or patient_hashes.dtype.kind != "U":
        raise DatasetError(f"patient_hashes must be str ({ds.num_patients},), got "
                           f"{patient_hashes.dtype} {patient_hashes.shape}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "images": ds.images, "labels": ds.labels, "patients": ds.patients,
        "class_names": np.array(ds.class_names, dtype=np.str_),
        "patient_hashes": patient_hashes,
        "patient_identity": np.array(ds.patient_identity),
        "fingerprint": np.array(fingerprint, dtype=np.str_),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    target = cache_dir / CACHE_FILE
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".dataset-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(cache_dir)
    return target


def _open_cache(cache_dir: Path) -> dict[str, np.ndarray]:
    path = cache_dir / CACHE_FILE
    hint = "run `medsynth node prepare` (client.prepare.pipeline.prepare_site) to build it"
    if not path.is_file():
        raise DatasetError(f"no prepared dataset at {path}; {hint}")
    try:  # we own the handle: np.load leaks it when the zip is corrupt
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            missing = [key for key in _KEYS if key not in npz.files]
            if missing:
                raise DatasetError(f"prepared dataset {path} lacks {missing}; {hint} again")
            return {key: npz[key] for key in _KEYS}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"prepared dataset {path} is corrupt ({exc}); {hint} again") from exc


def load_cache(cache_dir: Path) -> LocalDataset:
    """Load and validate ``dataset.npz``; missing or corrupt -> :class:`DatasetError`."""
    arrays = _open_cache(cache_dir)
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise DatasetError(f"cache format {int(arrays['format_version'])} != {FORMAT_VERSION}; "
                           "run prepare again")
    return LocalDataset(
        images=arrays["images"],
        labels=arrays["labels"],
        patients=arrays["patients"],
        class_names=tuple(str(name) for name in arrays["class_names"]),
        patient_identity=bool(arrays["patient_identity"]),
    )


def read_cache_fingerprint(cache_dir: Path) -> str | None:
    """The fingerprint stored with the cache, or None when there is no readable cache.

    Only the small ``fingerprint`` member is read (``.npz`` members load lazily).
    """
    path = cache_dir / CACHE_FILE
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return str(npz["fingerprint"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def load_patient_hashes(cache_dir: Path) -> np.ndarray:
    """Salted patient hashes (P,), aligned with ``LocalDataset.patients`` indices."""
    return _open_cache(cache_dir)["patient_hashes"]


def resize_to_square(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W) in [0, 1] -> (size, size) float32 in [0, 1]: how every image gets its model side.

    Used by ``client.prepare.pipeline`` for the hospitals' caches and by ``common.evaluation.reference`` for the
    evaluation's real images, so both are resized by this one function.

    The frame is zero-padded (black) to a centred square, so the aspect ratio is kept and no
    content is cropped, then resized with Pillow's BILINEAR filter on 32-bit float ("F" mode):
    bilinear interpolation when enlarging (28 -> 32), a triangle filter widened by the scale
    factor when shrinking, i.e. antialiased, no overshoot.
    """
    h, w = frame.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = frame
    if side == size:
        return square
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
