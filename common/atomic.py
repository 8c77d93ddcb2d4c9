"""Durable atomic file writes: a crash leaves either the old file or the new one, never a mix.

Identity used: ``rename(2)`` within one folder is atomic; data is made durable by fsync of the
temporary file before the rename and of the folder after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` for a read-modify-write cycle of ``path``
    (processes of one hospital take turns; the lock file is never removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Temp file in the same folder → write → fsync → rename over ``path`` → fsync folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a stale temp file from a crash may carry wider permissions; the umask narrower
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(obj: Any) -> Any:
    """Copy with NaN/inf replaced by None: strict JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, payload: Any, *, mode: int = 0o644) -> None:
    """Strict JSON (sorted keys, NaN/inf as null), written with ``write_bytes_atomic``."""
    data = json.dumps(json_safe(payload), indent=1, sort_keys=True, allow_nan=False).encode()
    write_bytes_atomic(path, data + b"\n", mode=mode)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, unreadable or not an object.

    For readers of a run folder (report, provenance) that must work on a partial or crashed run.
    """
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
