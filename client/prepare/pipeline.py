"""A hospital's DICOM folder -> the local training cache (``common.dataset``), with a report.

Every entry under the data folder is listed without following links (``common.dicom.paths``;
hidden entries, whose name starts with ".", are skipped);
each regular file is read in a sandboxed worker (``client.prepare.workers``: time and memory
limit per file) by ``common.dicom.read.read_image_frames``, selected by modality / body part and
labelled (``client.prepare.labels``: sub-folder, CSV or attribute); each of its frames becomes
one image, resized to the model size. Files are processed by ``os.cpu_count()`` workers; results
are ordered by path, so the cache does not depend on which worker finished first.

Nothing from the header is kept except the label and, per privacy unit, a salted hash: files
are grouped into privacy units by union-find over Patient ID (0010,0020) and Study Instance UID
(0020,000D) (``client.prepare.patients``: one person is never split), and each unit's key
(its Patient ID, else its study, else its file) is kept only as SHA-256(salt + key), used for
patient-level sampling. The cache is rebuilt only when the folder changes: its fingerprint
covers every entry's (relative path, size, mtime_ns) and every setting that changes the result
(image size, labels and their CSV's digest, selection, caps, limits, pipeline version, salt hash,
the optional denoising step of ``common.denoise``: a different step rebuilds the cache).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import secrets
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.prepare.labels import LabelError, LabelRule, Selection, attribute_rule, csv_rule, folder_rule
from client.prepare.pairs import pair_with_segmentations
from client.prepare.patients import FileIdentity, group_privacy_units
from client.prepare.report import PrepareReport
from client.prepare.workers import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    DEFAULT_TIME_LIMIT_S,
    FileJob,
    FileOutcome,
    PrepareSettings,
    SandboxPool,
    WorkerError,
    process_file,
)
from common.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from common.dataset import DatasetError, LocalDataset, read_cache_fingerprint, resize_to_square, save_cache
from common.denoise import check_denoise
from common.dicom.errors import REJECTION_FIXES, DicomRejected
from common.dicom.paths import FolderEntry, walk_data_folder
from common.dicom.read import DEFAULT_MAX_DECODED_BYTES, ReadLimits
from common.errors import UserError
from common.pairs import is_mask_rel, mask_rel

__all__ = ["PIPELINE_VERSION", "REJECTED_LIST_COLUMNS", "REPORT_FILE", "PrepareError", "PrepareReport",
           "load_or_create_salt", "prepare_site", "resize_to_square", "site_fingerprint",
           "write_rejected_list"]

log = logging.getLogger(__name__)

PIPELINE_VERSION = 5  # bump when decoding, resizing or patient indexing changes, so caches rebuild
REPORT_FILE = "prepare_report.json"
REJECTED_LIST_COLUMNS = ("path", "reason", "detail", "fix")
SALT_BYTES = 32


class PrepareError(UserError):
    """The folder cannot be turned into a dataset (nothing usable, bad salt, bad options)."""


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


def site_fingerprint(entries: Sequence[FolderEntry], settings: PrepareSettings, salt: bytes) -> str:
    """SHA-256 over sorted (path, size, mtime_ns) and every setting that changes the cache.

    ``entries`` are the whole data folder's, so in pair mode the masks under ``masks/`` are
    covered too: a changed mask rebuilds the cache.
    """
    h = hashlib.sha256()
    config = {
        "pipeline": PIPELINE_VERSION, "image_size": settings.image_size,
        "labels": settings.labels.describe(), "selection": settings.selection.describe(),
        "limits": [settings.limits.max_decoded_bytes, settings.limits.max_file_bytes,
                   settings.limits.max_inflated_bytes, settings.time_limit_s,
                   settings.memory_limit_bytes],
        "salt": hashlib.sha256(salt).hexdigest(),
        "denoise": settings.denoise,
        "pairs": settings.pairs,
    }
    h.update(json.dumps(config, sort_keys=True).encode())
    for rel, st in entries:
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


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


def label_rule_for(data_dir: Path, class_names: Sequence[str] | None, labels_csv: Path | None,
                   label_attribute: str | None) -> LabelRule:
    """The one label source the options name (sub-folders by default)."""
    classes = tuple(class_names) if class_names is not None else None
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise PrepareError(f"class names must be non-empty and unique, got {list(classes)}")
    try:
        if labels_csv is not None and label_attribute:
            raise LabelError("give labels by CSV or by attribute, not both")
        if labels_csv is not None:
            rule = csv_rule(labels_csv, classes)
        elif label_attribute:
            rule = attribute_rule(label_attribute, classes)
        else:
            rule = folder_rule(data_dir, classes)
    except LabelError as exc:
        raise PrepareError(str(exc)) from exc
    if rule.classes is not None and (not rule.classes or len(set(rule.classes)) != len(rule.classes)):
        raise PrepareError(f"need unique labels: sub-folders of {data_dir} or labels in the CSV, "
                           f"got {list(rule.classes)}")
    return rule


def triage(entries: Sequence[FolderEntry], rule: LabelRule,
           pairs: bool = False) -> tuple[list[FileJob], list[FileOutcome]]:
    """Split entries into files to read and those refused from their listing alone.

    In pair mode a file whose path has no label is still read, as a possible DICOM SEG (a SEG
    may lie anywhere in the data folder); it keeps its label verdict when it is none.
    """
    jobs: list[FileJob] = []
    refused: list[FileOutcome] = []
    for rel, st in entries:
        try:
            if stat.S_ISLNK(st.st_mode):
                raise DicomRejected("symlink", "a symbolic link; links are not followed")
            if not stat.S_ISREG(st.st_mode):
                raise DicomRejected("not-a-regular-file", "not a regular file")
            rule.label_without_header(rel)
        except DicomRejected as exc:
            if pairs and exc.reason in ("no-label", "unknown-label"):
                jobs.append(FileJob(rel, st, refused_by_path=exc))
            else:
                refused.append(FileOutcome(rel, reason=exc.reason, message=exc.message, fix=exc.fix))
            continue
        jobs.append(FileJob(rel, st))
    return jobs, refused


def run_jobs(jobs: list[FileJob], settings: PrepareSettings, workers: int) -> Iterator[FileOutcome]:
    """Outcomes of ``jobs``: in sandboxed workers, or in this process when ``workers`` is 0."""
    if workers == 0:  # no time or memory limit: debugging, and files this process wrote itself (a simulation)
        yield from (process_file(job, settings) for job in jobs)
        return
    try:
        with SandboxPool(settings, workers) as pool:
            yield from pool.run(jobs)
    except WorkerError as exc:
        raise PrepareError(str(exc)) from exc


def prepare_site(data_dir: Path, cache_dir: Path, *, image_size: int, salt: bytes,
                 progress: bool = True, force: bool = False,
                 class_names: Sequence[str] | None = None,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 labels_csv: Path | None = None, label_attribute: str | None = None,
                 modalities: Sequence[str] = (), body_parts: Sequence[str] = (),
                 workers: int | None = None, limits: ReadLimits | None = None,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                 memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES,
                 rejected_list: Path | None = None, denoise: str = "none", pairs: bool = False) -> PrepareReport:
    """Decode ``data_dir`` into ``cache_dir`` (or reuse the cache) and report what happened.

    ``class_names`` fixes the label order across sites; by default it is the sorted list of
    sub-folders, of CSV labels, or of the attribute values found. ``workers`` defaults to
    ``os.cpu_count()``; 0 decodes in this process without time or memory limits (debugging).
    ``limits`` overrides ``max_decoded_bytes``. ``rejected_list``: write every rejected file
    with its reason, the detail and the fix to this CSV (:func:`write_rejected_list`); it names
    files, so it is written only when asked, mode 0600, and never inside the data folder. Asking
    for it decodes the folder again (the cache keeps no per-file outcome). ``denoise``: the optional
    step of ``common.denoise`` applied to every frame before resizing (``median3`` for salt-and-pepper
    noise); part of the fingerprint. ``pairs`` (run mode ``model.pairs``): pair every image with its
    mask ``masks/<same path>.png`` (``common.pairs``) or, when it has none, with the DICOM SEG files
    anywhere in the folder that name it (``client.prepare.pairs``); the cache's images get the mask as
    a second channel (N, 2, S, S); an image without a usable mask is rejected by reason (``no-mask``,
    ``mask-unreadable``, ``mask-mismatch``), as is a SEG naming no image, and PNG masks naming no
    image are counted.
    """
    data_dir, cache_dir = data_dir.resolve(), cache_dir.resolve()
    if not data_dir.is_dir():
        raise PrepareError(f"data folder {data_dir} does not exist or is not a folder")
    if cache_dir == data_dir or data_dir in cache_dir.parents:
        raise PrepareError(f"cache folder {cache_dir} must be outside the data folder {data_dir}")
    if image_size < 1:
        raise PrepareError(f"image_size must be positive, got {image_size}")
    if rejected_list is not None:
        rejected_list = rejected_list.resolve()
        if data_dir in rejected_list.parents:
            raise PrepareError(f"the rejected-files list {rejected_list} must be outside the data "
                               f"folder {data_dir}")
        force = True
    rule = label_rule_for(data_dir, class_names, labels_csv, label_attribute)
    settings = PrepareSettings(root=data_dir, image_size=image_size, labels=rule,
                               selection=Selection.of(modalities, body_parts),
                               limits=limits or ReadLimits(max_decoded_bytes=max_decoded_bytes),
                               time_limit_s=time_limit_s, memory_limit_bytes=memory_limit_bytes,
                               denoise=check_denoise(denoise), pairs=pairs)
    try:
        entries = walk_data_folder(data_dir)
    except OSError as exc:
        raise PrepareError(f"cannot list {data_dir}: {exc}") from exc
    # The masks/ folder (common.pairs) never holds training images: in pair mode its files are the
    # masks (covered by the fingerprint), otherwise they are ignored (and so not fingerprinted).
    mask_entries = {rel for rel, _ in entries if is_mask_rel(rel)}
    images_only = [entry for entry in entries if entry[0] not in mask_entries]
    fingerprint = site_fingerprint(entries if pairs else images_only, settings, salt)
    if not force and (cached := _cached_report(cache_dir, fingerprint)) is not None:
        return cached

    entries = images_only
    jobs, outcomes = triage(entries, rule, pairs)
    workers = (os.cpu_count() or 1) if workers is None else workers
    with tqdm(total=len(entries), initial=len(outcomes), desc="prepare", unit="file",
              disable=not progress) as bar:
        for outcome in run_jobs(jobs, settings, min(workers, len(jobs))):
            outcomes.append(outcome)
            bar.update(1)
    outcomes.sort(key=lambda o: o.rel)
    masks_from_seg = 0
    if pairs:
        pairing = pair_with_segmentations(outcomes, image_size)
        outcomes, masks_from_seg = pairing.outcomes, pairing.masks_from_seg
    if rejected_list is not None:
        write_rejected_list(rejected_list, outcomes)
    dataset, patient_hashes, report = build_dataset(outcomes, rule, salt, len(entries))
    if pairs:
        named = {mask_rel(rel) for rel, _ in entries}
        report = replace(report, pairs=True, masks_without_image=len(mask_entries - named),
                         masks_from_seg=masks_from_seg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    envelope = {"fingerprint": fingerprint, "report": json.loads(report.to_json())}
    write_json_atomic(cache_dir / REPORT_FILE, envelope)  # first; the dataset is the commit point
    try:
        save_cache(dataset, cache_dir, fingerprint, patient_hashes)  # the commit point
    except DatasetError as exc:
        raise PrepareError(f"cannot write the cache in {cache_dir}: {exc}") from exc
    return report


def rejection_fix(outcome: FileOutcome) -> str:
    """What a person can do about a rejected file: its own fix, else its reason's default."""
    return outcome.fix or REJECTION_FIXES.get(outcome.reason or "", "")


def write_rejected_list(path: Path, outcomes: Sequence[FileOutcome]) -> int:
    """CSV of every rejected file (columns :data:`REJECTED_LIST_COLUMNS`); returns the row count.

    Hospital-local: it holds file names (which may contain patient names), so it is written
    atomically with mode 0600 and never leaves the site; the report keeps counts only.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REJECTED_LIST_COLUMNS)
    rows = [(o.rel, o.reason, o.message, rejection_fix(o)) for o in outcomes if o.reason is not None]
    writer.writerows(rows)
    try:
        write_bytes_atomic(path, buffer.getvalue().encode("utf-8", "surrogateescape"), mode=0o600)
    except OSError as exc:
        raise PrepareError(f"cannot write the rejected-files list {path}: {exc}") from exc
    return len(rows)


def _channels_first(images: np.ndarray) -> np.ndarray:
    """(N, S, S) → (N, 1, S, S); pairs (N, 2, S, S) stay as they are."""
    return images[:, None] if images.ndim == 3 else images


def build_dataset(outcomes: Sequence[FileOutcome], rule: LabelRule, salt: bytes,
                  files_seen: int) -> tuple[LocalDataset, np.ndarray, PrepareReport]:
    """The dataset, its patient hashes and the report, from per-file outcomes sorted by path."""
    rejected: Counter[str] = Counter()
    kept = [(o, o.images) for o in outcomes if o.images is not None]
    for outcome in outcomes:
        if outcome.reason is not None:
            rejected[outcome.reason] += 1
            log_call = log.warning if outcome.reason == "internal-error" else log.info
            log_call("rejected %s: %s: %s; fix: %s", outcome.rel, outcome.reason, outcome.message,
                     rejection_fix(outcome))
        for warning in outcome.warnings:
            log.info("%s: warning: %s", outcome.rel, warning)
    if not kept:
        raise PrepareError(f"no usable images ({files_seen} files; rejected: {dict(sorted(rejected.items()))}); "
                           "expected DICOM images under <data_dir>/<label>/, or labels by CSV or "
                           "attribute; run with -v to see why each file was rejected")
    class_names = rule.classes or tuple(sorted({o.label for o, _ in kept}))
    class_index = {name: i for i, name in enumerate(class_names)}
    # Unit index = order of first appearance in the (sorted) file list, never hash order, so
    # the index does not depend on the secret salt (seeded test runs stay comparable).
    units = group_privacy_units([FileIdentity(o.rel, o.patient_id, o.study_uid) for o, _ in kept])
    images: list[np.ndarray] = []
    labels: list[int] = []
    patients: list[int] = []
    for (outcome, frames), unit in zip(kept, units.unit_of_file, strict=True):
        if outcome.masks is not None:  # pair mode: (F, S, S) image and mask → (F, 2, S, S)
            frames = np.stack([frames, outcome.masks], axis=1)
        images.extend(frames)
        labels.extend([class_index[outcome.label]] * len(frames))
        patients.extend([unit] * len(frames))
    identity = units.patient_identity
    dataset = LocalDataset(
        images=_channels_first(np.clip(np.stack(images), -1.0, 1.0).astype(np.float32)),
        labels=np.array(labels, dtype=np.int64),
        patients=np.array(patients, dtype=np.int64),
        class_names=class_names,
        patient_identity=identity,
    )
    hashes = [hashlib.sha256(salt + key).hexdigest() for key in units.keys]
    counts = np.bincount(dataset.labels, minlength=len(class_names))
    used_keys = {o.label_key for o, _ in kept} | {o.rel for o in outcomes}
    report = PrepareReport(
        files_seen=files_seen, images_kept=len(images), patients=dataset.num_patients,
        patient_identity=identity,
        label_counts={name: int(counts[i]) for i, name in enumerate(class_names)},
        rejected=dict(sorted(rejected.items())), from_cache=False, files_kept=len(kept),
        files_with_warnings=sum(1 for o, _ in kept if o.warnings),
        csv_rows_unmatched=len(set(rule.by_path) - used_keys) if rule.mode == "csv" else 0,
        files_without_patient_id=units.files_without_patient_id,
        files_linked_by_study=units.files_linked_by_study,
        units_without_patient_id=units.units_without_patient_id,
        units_with_several_patient_ids=units.units_with_several_patient_ids,
    )
    return dataset, np.array(hashes, dtype=np.str_), report
