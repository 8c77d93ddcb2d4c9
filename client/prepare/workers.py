"""Each DICOM file decoded in a worker process with a time limit and a memory limit.

A hostile file may hang a native decoder or make it allocate without bound; neither can be
stopped from inside the process. :class:`SandboxPool` therefore runs :func:`process_file` in
``workers`` separate Python processes:

* memory: each worker, once its imports are done, caps its own address space with
  ``setrlimit(RLIMIT_AS)`` at its current size + ``memory_limit_bytes``; an allocation past it
  fails with MemoryError (``out-of-memory``) or kills the process (``worker-crashed``);
* time: the parent kills a worker whose file is not done after ``time_limit_s`` (``timeout``)
  and starts a fresh one; a worker that dies (a native crash) yields ``worker-crashed``.

Each outcome carries the frames already resized to the model size (small to send back).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from client.prepare.labels import LabelRule, Selection
from common.dataset import resize_to_square
from common.denoise import denoise
from common.dicom.errors import DicomRejected
from common.dicom.header import read_header_text
from common.dicom.read import ReadLimits, read_image_frames
from common.dicom.seg import read_segmentation
from common.pairs import MaskUnreadable, read_mask, to_mask_channel

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT_S = 60.0
DEFAULT_MEMORY_LIMIT_BYTES = 3 * 2**30
_START_TIMEOUT_S = 120.0
_MAX_FAILED_STARTS = 3
_JOBS_PER_WORKER = 2
_WORKER_COMMAND = "import sys; from client.prepare.workers import worker_main; worker_main()"


@dataclass(frozen=True)
class PrepareSettings:
    """Everything a worker needs to turn one file into training images."""

    root: Path
    image_size: int
    labels: LabelRule
    selection: Selection = field(default_factory=Selection)
    limits: ReadLimits = field(default_factory=ReadLimits)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES
    denoise: str = "none"  # common.denoise: a median filter for impulse noise, before resizing
    pairs: bool = False  # model.pairs: read each image's mask too (common.pairs)


@dataclass(frozen=True)
class FileJob:
    rel: str  # POSIX path relative to the data folder
    stat: os.stat_result  # lstat when the folder was listed
    # pair mode: the file's path alone rules it out as an image (no-label, unknown-label); it is
    # read only as a possible DICOM SEG, and keeps this verdict when it is none
    refused_by_path: DicomRejected | None = None


@dataclass(frozen=True, eq=False)
class SegmentationPart:
    """One image's mask from a DICOM SEG file (``common.dicom.seg``) at the SEG's own size.

    Kept at full size (bit-packed) so that the masks of several SEGs naming one image are joined
    before the one resize, exactly as one mask would be.
    """

    source_uid: str  # SOP Instance UID (0008,0018) of the image the SEG names
    shape: tuple[int, int]  # (H, W) of the SEG's frames: must be the image's
    packed: np.ndarray  # np.packbits of the bool (H, W) mask, row-major

    def mask(self) -> np.ndarray:
        """The bool (H, W) mask, True = foreground."""
        count = self.shape[0] * self.shape[1]
        return np.unpackbits(self.packed, count=count).astype(bool).reshape(self.shape)


@dataclass(frozen=True, eq=False)
class FileOutcome:
    """One file's result: images (F, S, S) float32 in [-1, 1], or a rejection reason.

    In pair mode ``masks`` (F, S, S) float32 in {-1, 1} is the image's mask, resized alike; it
    is None for an image without a PNG mask, whose mask may come from a DICOM SEG
    (``client.prepare.pairs`` matches them by ``sop_instance_uid`` once every file is read). A
    SEG file is rejected as ``not-an-image`` and carries the masks it holds in ``segmentation``.
    """

    rel: str
    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    label: str = ""
    label_key: str = ""  # the CSV key, folder or attribute that gave the label
    patient_id: str | None = None  # Patient ID (0010,0020)
    study_uid: str | None = None  # Study Instance UID (0020,000D)
    reason: str | None = None
    message: str = ""
    fix: str = ""  # what a person can do about the rejection; "" = the reason's default
    warnings: tuple[str, ...] = ()
    # pair mode only, held in memory while preparing, never cached or reported:
    sop_instance_uid: str = ""  # the image's SOP Instance UID (0008,0018), named by DICOM SEG files
    frame_shape: tuple[int, int] | None = None  # (H, W) of an image waiting for a DICOM SEG mask
    segmentation: tuple[SegmentationPart, ...] = ()  # the masks a DICOM SEG file holds


Handler = Callable[[FileJob, PrepareSettings], FileOutcome]


def process_file(job: FileJob, settings: PrepareSettings) -> FileOutcome:
    """Read, select, label and resize one file; every failure becomes a rejection outcome.

    In pair mode a file that is no image (or whose path has no label) is read again as a
    possible DICOM SEG (:func:`read_segmentation_outcome`).
    """
    verdict = job.refused_by_path
    try:
        if verdict is None:
            try:
                return _read_image(job, settings)
            except DicomRejected as exc:
                if not (settings.pairs and exc.reason == "not-an-image"):
                    raise
                verdict = exc
        return read_segmentation_outcome(job, settings, verdict)
    except DicomRejected as exc:
        return FileOutcome(job.rel, reason=exc.reason, message=exc.message, fix=exc.fix)
    except MemoryError:
        return FileOutcome(job.rel, reason="out-of-memory", message="out of memory while decoding")
    except Exception as exc:  # a bug in medsynth, not a verdict on the file: report it as such
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("internal error on %s:\n%s", job.rel, traceback.format_exc())
        return FileOutcome(job.rel, reason="internal-error", message=detail)


def _read_image(job: FileJob, settings: PrepareSettings) -> FileOutcome:
    """One image file: its frames resized, its label and, in pair mode, its PNG mask or its UID."""
    found: list[tuple[str, str]] = []
    uids: list[str] = []

    def screen(ds: Dataset) -> None:
        settings.selection.check(ds)
        found.append(settings.labels.label_for(job.rel, ds))
        uids.append(read_header_text(ds, "SOPInstanceUID") if settings.pairs else "")

    image = read_image_frames(settings.root / job.rel, limits=settings.limits, screen=screen,
                              root=settings.root, expected=job.stat)
    images = np.stack([resize_to_square(denoise(f, settings.denoise), settings.image_size) for f in image.frames])
    (label, key), = found  # the screen ran exactly once, before decoding
    masks = read_pair_mask(job.rel, image.frames, settings) if settings.pairs else None
    _, height, width = image.frames.shape  # (F, H, W)
    waiting = settings.pairs and masks is None  # no PNG mask: a DICOM SEG may name this image
    return FileOutcome(job.rel, images=images * 2.0 - 1.0, masks=masks, label=label, label_key=key,
                       patient_id=image.patient_id, study_uid=image.study_uid, warnings=image.warnings,
                       sop_instance_uid=uids[0], frame_shape=(int(height), int(width)) if waiting else None)


def read_pair_mask(rel: str, frames: np.ndarray, settings: PrepareSettings) -> np.ndarray | None:
    """The PNG mask of image ``rel`` as (1, S, S) float32 in {-1, 1}, resized exactly as its one frame.

    None when there is no PNG mask (a DICOM SEG may still supply it). A PNG mask, where there is
    one, is the mask: a SEG naming the same image is then not used. Rejections
    (``DicomRejected``): ``mask-unreadable``, ``mask-mismatch`` (a size other than the frame's,
    or an image of several frames: one mask cannot label them all).
    """
    try:
        mask = read_mask(settings.root, rel, settings.limits.max_decoded_bytes)
    except MaskUnreadable as exc:
        if exc.reason == "no-mask":
            return None
        raise DicomRejected(exc.reason, str(exc)) from exc
    if len(frames) != 1:
        raise DicomRejected("mask-mismatch", f"the image has {len(frames)} frames; a pair needs one frame per file")
    if mask.shape != frames[0].shape:
        raise DicomRejected("mask-mismatch", f"mask {mask.shape[1]}×{mask.shape[0]} but image "
                                             f"{frames[0].shape[1]}×{frames[0].shape[0]} pixels")
    return mask_channel(mask, settings.image_size)


def mask_channel(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A bool mask (H, W) → (1, S, S) float32 in {-1, 1}: the image's resize, then the threshold."""
    resized = resize_to_square(mask.astype(np.float32), image_size)  # (S, S) in [0, 1]
    return to_mask_channel(resized)[None]


def read_segmentation_outcome(job: FileJob, settings: PrepareSettings, verdict: DicomRejected) -> FileOutcome:
    """A file that is no training image (``verdict``) read again as a DICOM SEG (pair mode).

    A SEG stays rejected as ``not-an-image`` and carries its masks; a broken SEG is
    ``mask-unreadable``; a file that is no SEG keeps ``verdict``.
    """
    try:
        seg = read_segmentation(settings.root / job.rel, limits=settings.limits, root=settings.root,
                                expected=job.stat)
    except DicomRejected as exc:
        if exc.reason not in ("mask-unreadable", "out-of-memory"):
            seg = None  # not even a parseable DICOM object: its first verdict says more
        else:
            raise
    if seg is None:
        raise verdict
    parts = tuple(SegmentationPart(m.source_uid, (int(m.mask.shape[0]), int(m.mask.shape[1])), np.packbits(m.mask))
                  for m in seg.masks)
    return FileOutcome(job.rel, reason="not-an-image", message=f"a DICOM SEG holding the masks of {len(parts)} "
                       "image(s), used in pair mode", segmentation=parts, warnings=seg.warnings)


def _limit_address_space(extra_bytes: int) -> None:
    """RLIMIT_AS = current virtual size + ``extra_bytes`` (Linux; elsewhere no limit)."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:")))
    except (ImportError, OSError, StopIteration, ValueError):
        log.warning("no per-file memory limit on this platform")
        return
    soft = vm_kib * 1024 + extra_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def worker_main() -> None:
    """Entry point of a worker process (``python -c``): argv[1] is its socket's descriptor.

    Receives (settings, handler), limits itself, says "ready", then answers jobs until None.
    """
    conn = Connection(int(sys.argv[1]))
    settings, handler = conn.recv()
    if settings.memory_limit_bytes is not None:
        _limit_address_space(settings.memory_limit_bytes)
    conn.send("ready")
    try:
        while (job := conn.recv()) is not None:
            conn.send(handler(job, settings))
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone (killed, interrupted): nothing left to answer
    conn.close()


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    ready: bool = False
    jobs: deque[FileJob] = field(default_factory=deque)  # sent, not answered; the first runs
    started: float = field(default_factory=time.monotonic)  # start of the first job (or of start-up)


class WorkerError(RuntimeError):
    """Decoding workers could not be started, or answered out of protocol (the message says)."""


class SandboxPool:
    """``workers`` sandboxed processes running ``handler`` (default :func:`process_file`).

    Workers are fresh interpreters (``python -c "...worker_main()"``) talking over a socket
    pair: nothing of the caller is inherited (threads, open files, the main script), and a
    worker can be killed without harming the others. Each worker holds up to two jobs, so it
    never waits for the parent between files; the time limit of a job starts when the worker
    finished the previous one. A job queued behind one that hangs or crashes is re-queued.
    """

    def __init__(self, settings: PrepareSettings, workers: int, handler: Handler = process_file) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.settings, self.handler, self.size = settings, handler, workers
        self._workers: list[_Worker] = []
        self._pending: deque[FileJob] = deque()
        self._failed_starts = 0

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        worker = _Worker(process, conn)
        self._workers.append(worker)
        conn.send((self.settings, self.handler))
        return worker

    def _stop(self, worker: _Worker) -> None:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.conn.close()
        self._workers.remove(worker)

    def close(self) -> None:
        """Ask idle workers to exit, kill the rest."""
        for worker in list(self._workers):
            if worker.ready and not worker.jobs:
                try:
                    worker.conn.send(None)
                    worker.process.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # gone or stuck: _stop kills and reaps whatever is left
            self._stop(worker)

    def _dead(self, worker: _Worker, reason: str, message: str) -> FileOutcome | None:
        """Replace a worker that died or overran; the outcome of the file it was running."""
        self._stop(worker)
        if not worker.ready:
            self._failed_starts += 1
            if self._failed_starts >= _MAX_FAILED_STARTS:
                raise WorkerError(f"decoding workers die at start ({message}); check the "
                                       "memory limit and the Python environment")
        self._start()
        if not worker.jobs:
            return None
        running = worker.jobs.popleft()
        self._pending.extendleft(reversed(worker.jobs))  # queued behind it: not their fault
        return FileOutcome(running.rel, reason=reason, message=message)

    def run(self, jobs: Iterable[FileJob]) -> Iterator[FileOutcome]:
        """Yield one outcome per job, in completion order."""
        self._pending = deque(jobs)
        while len(self._workers) < min(self.size, max(len(self._pending), 1)):
            self._start()
        while self._pending or any(w.jobs for w in self._workers):
            for worker in self._workers:
                while worker.ready and len(worker.jobs) < _JOBS_PER_WORKER and self._pending:
                    if not worker.jobs:
                        worker.started = time.monotonic()
                    worker.jobs.append(self._pending.popleft())
                    worker.conn.send(worker.jobs[-1])
            yield from self._collect()

    def _deadline(self, worker: _Worker) -> float | None:
        """When a busy or starting worker is overdue; None for an idle one."""
        if not worker.ready:
            return worker.started + _START_TIMEOUT_S
        return worker.started + self.settings.time_limit_s if worker.jobs else None

    def _collect(self) -> Iterator[FileOutcome]:
        deadlines = [d for w in self._workers if (d := self._deadline(w)) is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = wait([w.conn for w in self._workers], timeout=timeout)
        for worker in list(self._workers):
            outcome: FileOutcome | None = None
            deadline = self._deadline(worker)
            if worker.conn in ready:
                outcome = self._receive(worker)
            elif deadline is not None and time.monotonic() > deadline:
                what = "decoding" if worker.ready else "starting the worker"
                limit = self.settings.time_limit_s if worker.ready else _START_TIMEOUT_S
                outcome = self._dead(worker, "timeout", f"{what} took longer than {limit:g} s; "
                                     "the process was stopped")
            if outcome is not None:
                yield outcome

    def _receive(self, worker: _Worker) -> FileOutcome | None:
        """A worker's message: "ready", an outcome, or end of file when it died."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.process.wait()
            return self._dead(worker, "worker-crashed", f"the decoding process died (exit code "
                              f"{code}); a native decoder crashed or was killed")
        worker.started = time.monotonic()  # start-up done, or the next queued job starts now
        if message == "ready":
            worker.ready = True
            return None
        if not isinstance(message, FileOutcome) or not worker.jobs or message.rel != worker.jobs[0].rel:
            raise WorkerError(f"unexpected message from a decoding worker: {type(message)}")
        worker.jobs.popleft()
        return message
