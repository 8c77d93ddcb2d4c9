"""A hospital's DICOM folder -> the local training cache (``common.dataset``).

Layout: ``<data_dir>/<class name>/**/<file>``. The first path component under ``data_dir`` is
the label; files directly in ``data_dir`` are rejected as ``no-label``. Hidden entries (name
starting with ".") are skipped. Every other file is read by ``common.dicom.read_image_frames``;
each of its frames becomes one image. Nothing from the header is kept except a salted hash of
the patient key: SHA-256(salt + Patient ID (0010,0020), else Study Instance UID (0020,000D)).

The cache is rebuilt only when the folder changes: its fingerprint covers every file's
(relative path, size, mtime_ns), the image size, the class list, the decode cap, the pipeline
version and a hash of the salt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.atomic import fsync_dir, write_json_atomic
from common.dataset import (
    DatasetError,
    LocalDataset,
    read_cache_fingerprint,
    save_cache,
)
from common.dicom import DEFAULT_MAX_DECODED_BYTES, DicomRejected, read_image_frames

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # bump when decoding, resizing or patient indexing changes, so caches rebuild
REPORT_FILE = "prepare_report.json"
SALT_BYTES = 32


class PrepareError(Exception):
    """The folder cannot be turned into a dataset (nothing usable, bad salt, bad layout)."""


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare_site`` found; safe to show and log (counts only, no identifiers)."""

    files_seen: int
    images_kept: int
    patients: int
    patient_identity: bool
    label_counts: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrepareReport:
        data = json.loads(text)
        return cls(
            files_seen=int(data["files_seen"]),
            images_kept=int(data["images_kept"]),
            patients=int(data["patients"]),
            patient_identity=bool(data["patient_identity"]),
            label_counts={str(k): int(v) for k, v in data["label_counts"].items()},
            rejected={str(k): int(v) for k, v in data["rejected"].items()},
            from_cache=bool(data["from_cache"]),
        )

    def format(self) -> str:
        """A short human-readable table."""
        lines = [
            f"{'files seen':<24}{self.files_seen:>8}",
            f"{'images kept':<24}{self.images_kept:>8}",
            f"{'patients':<24}{self.patients:>8}",
        ]
        lines += [f"{'  label ' + name:<24}{n:>8}" for name, n in sorted(self.label_counts.items())]
        lines += [f"{'  rejected ' + why:<24}{n:>8}" for why, n in sorted(self.rejected.items())]
        lines.append(f"{'from cache':<24}{'yes' if self.from_cache else 'no':>8}")
        if not self.patient_identity:
            lines.append("note: some files have no Patient ID (0010,0020) nor Study Instance UID "
                         "(0020,000D); each such file counts as its own patient")
        return "\n".join(lines)


def load_or_create_salt(path: Path) -> bytes:
    """The site's secret salt: 32 random bytes made once (mode 0600), then read back.

    Created atomically (temp file + ``os.link``), so two processes never see different salts.
    Losing it changes every patient hash; it never leaves the site.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".salt-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(SALT_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use its salt
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(path.parent)
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise PrepareError(f"salt file {path} holds {len(salt)} bytes, expected {SALT_BYTES}; "
                           "restore it from backup (a new salt changes every patient hash)")
    if path.stat().st_mode & 0o077:
        log.warning("salt file %s is readable by other users; run chmod 600 on it", path)
    return salt


def list_site_files(data_dir: Path) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, lstat) of every non-hidden entry, sorted; symlinks not followed."""
    found: list[tuple[str, os.stat_result]] = []
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                full = Path(root) / name
                found.append((full.relative_to(data_dir).as_posix(), full.lstat()))
    return sorted(found, key=lambda item: item[0])


def site_fingerprint(files: Sequence[tuple[str, os.stat_result]], *, image_size: int, salt: bytes,
                     class_names: Sequence[str], max_decoded_bytes: int) -> str:
    """SHA-256 over sorted (path, size, mtime_ns) and every setting that changes the cache."""
    h = hashlib.sha256()
    settings = {"pipeline": PIPELINE_VERSION, "image_size": image_size, "classes": list(class_names),
                "max_decoded_bytes": max_decoded_bytes, "salt": hashlib.sha256(salt).hexdigest()}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for rel, st in files:
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def resize_to_square(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W) in [0, 1] -> (size, size) float32 in [0, 1].

    The frame is zero-padded (black) to a centred square, so the aspect ratio is kept and no
    content is cropped, then resized with Pillow's BILINEAR filter on 32-bit float ("F" mode):
    bilinear interpolation when enlarging (28 -> 32), a triangle filter widened by the scale
    factor when shrinking, i.e. antialiased, no overshoot.
    """
    h, w = frame.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = frame
    if side == size:
        return square
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _cached_report(cache_dir: Path, fingerprint: str) -> PrepareReport | None:
    """The saved report when both it and the dataset carry ``fingerprint``; else None."""
    if read_cache_fingerprint(cache_dir) != fingerprint:
        return None
    try:
        saved = json.loads((cache_dir / REPORT_FILE).read_text(encoding="utf-8"))
        if saved.get("fingerprint") != fingerprint:
            return None
        return replace(PrepareReport.from_json(json.dumps(saved["report"])), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prepare_site(data_dir: Path, cache_dir: Path, *, image_size: int, salt: bytes,
                 progress: bool = True, force: bool = False,
                 class_names: Sequence[str] | None = None,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PrepareReport:
    """Decode ``data_dir`` into ``cache_dir`` (or reuse the cache) and report what happened.

    ``class_names`` fixes the label order across sites; by default it is the sorted list of
    sub-folders. Files under an unlisted folder are rejected as ``unknown-label``.
    """
    data_dir, cache_dir = data_dir.resolve(), cache_dir.resolve()
    if not data_dir.is_dir():
        raise PrepareError(f"data folder {data_dir} does not exist or is not a folder")
    if cache_dir == data_dir or data_dir in cache_dir.parents:
        raise PrepareError(f"cache folder {cache_dir} must be outside the data folder {data_dir}")
    if image_size < 1:
        raise PrepareError(f"image_size must be positive, got {image_size}")
    if class_names is None:
        class_names = sorted(p.name for p in data_dir.iterdir()
                             if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    if not class_names or len(set(class_names)) != len(class_names):
        raise PrepareError(f"need unique class folders under {data_dir}, got {list(class_names)}")
    files = list_site_files(data_dir)
    fingerprint = site_fingerprint(files, image_size=image_size, salt=salt,
                                   class_names=class_names, max_decoded_bytes=max_decoded_bytes)
    if not force and (cached := _cached_report(cache_dir, fingerprint)) is not None:
        return cached

    class_index = {name: i for i, name in enumerate(class_names)}
    rejected: Counter[str] = Counter()
    images: list[np.ndarray] = []
    labels: list[int] = []
    hashes: list[str] = []
    identity = True
    for rel, st in tqdm(files, desc="prepare", unit="file", disable=not progress):
        parts = rel.split("/")
        reason = None
        if not stat.S_ISREG(st.st_mode):
            reason = "not-a-regular-file"
        elif len(parts) < 2:
            reason = "no-label"
        elif parts[0] not in class_index:
            reason = "unknown-label"
        if reason is not None:
            rejected[reason] += 1
            continue
        try:
            image = read_image_frames(data_dir / rel, max_decoded_bytes=max_decoded_bytes)
        except DicomRejected as exc:
            rejected[exc.reason] += 1
            log.debug("rejected %s: %s", rel, exc)
            continue
        if image.patient_key is None:
            identity = False  # NUL cannot occur in Patient ID (LO), so no collision with keys
            key = b"\0file:" + rel.encode("utf-8", "surrogateescape")
        else:
            key = image.patient_key.encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(salt + key).hexdigest()
        for frame in image.frames:
            images.append(resize_to_square(frame, image_size) * 2.0 - 1.0)
            labels.append(class_index[parts[0]])
            hashes.append(digest)
    if not images:
        raise PrepareError(f"no usable images in {data_dir} ({len(files)} files; rejected: "
                           f"{dict(rejected)}); expected <data_dir>/<class>/<file>.dcm")

    # Patient index = order of first appearance in the (sorted) file list, not hash order, so
    # the index does not depend on the secret salt (seeded test runs stay comparable).
    first_seen = dict.fromkeys(hashes)
    index_of = {h: i for i, h in enumerate(first_seen)}
    patient_hashes = np.array(list(first_seen), dtype=np.str_)
    patients = np.array([index_of[h] for h in hashes], dtype=np.int64)
    dataset = LocalDataset(
        images=np.clip(np.stack(images), -1.0, 1.0).astype(np.float32)[:, None],
        labels=np.array(labels, dtype=np.int64),
        patients=patients.astype(np.int64).reshape(-1),
        class_names=tuple(class_names),
        patient_identity=identity,
    )
    counts = np.bincount(dataset.labels, minlength=len(class_names))
    report = PrepareReport(
        files_seen=len(files), images_kept=len(images), patients=dataset.num_patients,
        patient_identity=identity,
        label_counts={name: int(counts[i]) for i, name in enumerate(class_names)},
        rejected=dict(sorted(rejected.items())), from_cache=False,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    envelope = {"fingerprint": fingerprint, "report": json.loads(report.to_json())}
    write_json_atomic(cache_dir / REPORT_FILE, envelope)  # first; the dataset is the commit point
    try:
        save_cache(dataset, cache_dir, fingerprint, patient_hashes)  # the commit point
    except DatasetError as exc:
        raise PrepareError(f"cannot write the cache in {cache_dir}: {exc}") from exc
    return report
