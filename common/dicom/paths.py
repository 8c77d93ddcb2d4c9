"""Finding and opening files inside a data folder without ever leaving it.

* :func:`walk_data_folder` lists every entry with ``os.scandir`` and ``lstat``; symbolic links
  are reported, never followed (a link could point anywhere, including /dev/zero).
* :func:`read_file_bytes` opens with ``O_NOFOLLOW | O_NONBLOCK`` (no link, no FIFO wait),
  checks the open file is the regular file that was listed (same device and inode), that its
  real path is inside the data folder, and that it is under the size cap, then reads it whole.
* :func:`check_dicomdir_references`: every Referenced File ID (0004,1500) of a DICOMDIR
  (PS3.3 F.3.2.2) must name a file inside the data folder: no absolute path, no "." or ".."
  component, no separator inside a component, and a real path under the root. Referenced files
  are never read through the DICOMDIR: the folder walk reads them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from pydicom.dataset import Dataset

from common.dicom.errors import DicomRejected

_FD_PATH = Path("/proc/self/fd")


class FolderEntry(NamedTuple):
    """One entry of the data folder: POSIX path relative to the root, and its ``lstat``."""

    rel: str
    stat: os.stat_result


def walk_data_folder(root: Path) -> list[FolderEntry]:
    """Every non-hidden entry under ``root`` that is not a folder, sorted by relative path.

    Folders are descended unless they are symbolic links; links (to files or folders), FIFOs,
    sockets and devices are listed so the caller can report them.
    """
    found: list[FolderEntry] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(Path(entry.path))
                else:
                    rel = Path(entry.path).relative_to(root).as_posix()
                    found.append(FolderEntry(rel, st))
    return sorted(found, key=lambda item: item.rel)


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` equals ``root`` or lies under it (both already resolved)."""
    path, root = os.fspath(path), os.fspath(root)
    return os.path.commonpath([path, root]) == root


def read_file_bytes(path: Path, *, root: Path, max_bytes: int,
                    expected: os.stat_result | None = None) -> bytes:
    """The whole file, after the link, type, identity, location and size checks above."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DicomRejected("symlink", "a symbolic link; copy the file itself into the data "
                                "folder") from exc
        raise DicomRejected("unreadable", f"cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DicomRejected("not-a-regular-file", "not a regular file (FIFO, socket or device)")
        if expected is not None and (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
            raise DicomRejected("file-changed", "replaced since the folder was listed; run again")
        real = os.path.realpath(_FD_PATH / str(fd)) if _FD_PATH.is_dir() else os.path.realpath(path)
        if not is_inside(real, os.path.realpath(root)):
            raise DicomRejected("outside-root", "its real path is outside the data folder")
        if st.st_size > max_bytes:
            raise DicomRejected("too-large", f"{st.st_size} bytes > file cap {max_bytes}; raise "
                                "the cap to accept it")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(st.st_size + 1)  # read(n) allocates n bytes up front: ask for the size
    except OSError as exc:
        raise DicomRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise DicomRejected("file-changed", "the file grew while it was read; run again")
    return data


def check_dicomdir_references(ds: Dataset, directory: Path, root: Path) -> int:
    """Check every Referenced File ID (0004,1500) of a DICOMDIR; returns how many there are."""
    real_root = os.path.realpath(root)
    count = 0
    for index, record in enumerate(ds.get("DirectoryRecordSequence") or []):
        value = record.get("ReferencedFileID")
        if value is None:
            continue
        parts = [str(value)] if isinstance(value, str) else [str(part) for part in value]
        count += 1
        shown = "/".join(parts)
        bad = [p for p in parts if p in ("", ".", "..") or any(c in p for c in "/\\\0:")]
        if not parts or bad:
            raise DicomRejected("outside-root", f"DICOMDIR record {index} has an unsafe Referenced "
                                f"File ID {shown!r}")
        if not is_inside(os.path.realpath(directory.joinpath(*parts)), real_root):
            raise DicomRejected("outside-root", f"DICOMDIR record {index} references {shown!r}, "
                                "which resolves outside the data folder")
    return count
