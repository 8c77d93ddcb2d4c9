"""The typed rejection every DICOM reading step raises, and the closed list of its reasons.

A file that cannot become training pixels raises :class:`DicomRejected` with a short stable
``reason`` (grouped and counted in the prepare report) and a message that says what was found
and what to do about it. Nothing else may escape the reader: any other exception is a bug.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# reason -> what it means for the user (also the README's table).
REJECTION_REASONS: dict[str, str] = {
    # the file system
    "unreadable": "the file could not be opened or read (permissions, I/O error, vanished)",
    "symlink": "a symbolic link: links are never followed, they could leave the data folder",
    "outside-root": "resolves outside the data folder, or a DICOMDIR references a file outside it",
    "not-a-regular-file": "a FIFO, socket or device, not a file",
    "file-changed": "the file was replaced between listing the folder and reading it",
    # the byte structure (PS3.10 file format, PS3.5 data elements)
    "not-dicom": "no DICOM Part 10 header (128-byte preamble, 'DICM', File Meta group 0002)",
    "missing-transfer-syntax": "the File Meta group has no Transfer Syntax UID (0002,0010)",
    "unsupported-transfer-syntax": "unknown transfer syntax, or no installed decoder for it",
    "truncated": "the file ends before an element or the pixel data it declares",
    "malformed": "invalid VR, inconsistent element or item lengths, nesting too deep, or a "
                 "parser error",
    "too-large": "the file, or its declared decoded pixels, exceed the size cap",
    "inflated-too-large": "a deflated dataset inflates beyond the size cap (deflate bomb)",
    # the content
    "not-an-image": "SR, SEG, RT, waveform, presentation state, DICOMDIR ... or no Image Pixel module",
    "unsupported-sop-class": "an image whose frames are not pictures (whole-slide tiles)",
    "invalid-header": "missing or inconsistent Image Pixel, LUT or window attributes",
    "unsupported-photometric": "a Photometric Interpretation (0028,0004) with no rule, e.g. "
                               "PALETTE COLOR",
    "no-pixel-data": "no Pixel Data (7FE0,0010)",
    "decode-failed": "pixel data present but the decoder failed or disagreed with the header",
    # the user's selection and labels
    "not-selected": "outside the requested modalities / body parts",
    "no-label": "no label for this file (folder, CSV row or attribute missing)",
    "unknown-label": "a label that is not one of the configured classes",
    # the sandbox around each file
    "timeout": "decoding took longer than the per-file time limit; the worker was stopped",
    "out-of-memory": "decoding needed more memory than the per-file limit",
    "worker-crashed": "the decoding process died (e.g. a crash in a native decoder)",
    "internal-error": "an unexpected error in medsynth itself: please report it",
}


class DicomRejected(Exception):
    """A file that cannot become training pixels; ``reason`` is a key of REJECTION_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown reason {reason!r}: use one of {sorted(REJECTION_REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[DicomRejected], tuple[str, str]]:
        """Pickle by (reason, message) so a rejection crosses a process boundary intact."""
        return (DicomRejected, (self.reason, self.message))


@contextmanager
def rejecting(reason: str, what: str) -> Iterator[None]:
    """Turn any exception of a third-party step into ``DicomRejected(reason)``.

    pydicom and the decoders raise many exception types on hostile input; MemoryError is
    kept apart (it becomes ``out-of-memory``, not a verdict on the file's content).
    """
    try:
        yield
    except (DicomRejected, MemoryError):
        raise
    except Exception as exc:  # third-party code: any type is possible on hostile bytes
        raise DicomRejected(reason, f"{what}: {type(exc).__name__}: {exc}") from exc
