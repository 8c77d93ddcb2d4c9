"""The typed rejection every DICOM reading step raises, and the closed list of its reasons.

A file that cannot become training pixels raises :class:`DicomRejected` with a short stable
``reason`` (grouped and counted in the prepare report), a ``message`` that says what was found,
and a ``fix``: what a person at the hospital can do about it (by default the reason's entry of
:data:`REJECTION_FIXES`; a call site that knows better passes its own). Nothing else may escape
the reader: any other exception is a bug.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from common.errors import UserError

# reason -> what it means for the user (also the table of docs/dicom.md, checked by tests/test_docs.py).
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
    "blank": "every frame is one constant grey (blank, or a window covering none of its values)",
    # the user's selection and labels
    "not-selected": "outside the requested modalities / body parts",
    "no-label": "no label for this file (folder, CSV row or attribute missing)",
    "unknown-label": "a label that is not one of the configured classes",
    # the image–mask pair (run mode model.pairs, common.pairs)
    "no-mask": "an image without its mask masks/<same path>.png and named by no DICOM SEG (pair mode)",
    "mask-unreadable": "the mask is not a one-frame greyscale PNG, is a link, or is too large; or a "
                       "DICOM SEG that cannot be read",
    "mask-mismatch": "the mask's size differs from the image's, or the image has several frames; or a "
                     "DICOM SEG names no image of the data folder",
    # the sandbox around each file
    "timeout": "decoding took longer than the per-file time limit; the worker was stopped",
    "out-of-memory": "decoding needed more memory than the per-file limit",
    "worker-crashed": "the decoding process died (e.g. a crash in a native decoder)",
    "internal-error": "an unexpected error in medsynth itself: please report it",
}


_REEXPORT = ("re-export it from the PACS or the modality as uncompressed DICOM (Explicit VR Little "
             "Endian)")

# reason -> what a person at the hospital can do about such a file (the default ``fix``).
REJECTION_FIXES: dict[str, str] = {
    "unreadable": "check the file's permissions and that the storage is readable, then run again",
    "symlink": "copy the file itself into the data folder instead of linking to it",
    "outside-root": "copy the referenced files into the data folder",
    "not-a-regular-file": "remove it from the data folder",
    "file-changed": "run again once nothing writes to the data folder",
    "not-dicom": "nothing to do if it is not an image (README, licence, report); otherwise "
                 "export it from the PACS as DICOM files",
    "missing-transfer-syntax": _REEXPORT,
    "unsupported-transfer-syntax": _REEXPORT,
    "truncated": "copy the file again from the PACS (the copy is incomplete)",
    "malformed": f"the file is damaged or was written by a faulty exporter: {_REEXPORT}",
    "too-large": "raise the size caps (ReadLimits) if the file is genuine, or export the series "
                 "as single-frame files",
    "inflated-too-large": _REEXPORT,
    "not-an-image": "nothing to do: only images are used for training",
    "unsupported-sop-class": "nothing to do: this kind of image is not used for training",
    "invalid-header": "fix the named attribute in the PACS and export again, or exclude the file",
    "unsupported-photometric": "export the image as MONOCHROME2 or RGB, or exclude it",
    "no-pixel-data": "nothing to do: the object holds no image",
    "decode-failed": f"the compressed frames are damaged or use a coding the decoders refuse: "
                     f"{_REEXPORT}",
    "blank": "nothing to learn from a blank image: nothing to do, or exclude it from the export",
    "not-selected": "nothing to do, or widen --modality / --body-part",
    "no-label": "give it a label: put it in a class sub-folder, add a CSV row, or set the attribute",
    "unknown-label": "add the label to --classes, or correct the label",
    "no-mask": "add its mask as masks/<same path>.png or as a DICOM SEG referencing it, or leave the "
               "image out of a pair run",
    "mask-unreadable": "save the mask as an 8-bit greyscale PNG (0 background, 255 foreground), or export "
                       "the DICOM SEG again",
    "mask-mismatch": "draw the mask on the image's own pixel grid, one single-frame image per mask",
    "timeout": "check the file in a viewer; if it is genuine, raise the per-file time limit",
    "out-of-memory": "if the file is genuine, raise the per-file memory limit",
    "worker-crashed": f"a native decoder crashed on this file: {_REEXPORT}",
    "internal-error": "report it to the medsynth maintainers with the message (not the file)",
}


class DicomRejected(UserError):
    """A file that cannot become training pixels; ``reason`` is a key of REJECTION_REASONS.

    ``fix`` says what a person can do; it defaults to ``REJECTION_FIXES[reason]``.
    """

    def __init__(self, reason: str, message: str, fix: str | None = None) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown reason {reason!r}: use one of {sorted(REJECTION_REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.fix = fix or REJECTION_FIXES[reason]

    def __reduce__(self) -> tuple[type[DicomRejected], tuple[str, str, str]]:
        """Pickle by (reason, message, fix) so a rejection crosses a process boundary intact."""
        return (DicomRejected, (self.reason, self.message, self.fix))


@contextmanager
def rejecting(reason: str, what: str, fix: str | None = None) -> Iterator[None]:
    """Turn any exception of a third-party step into ``DicomRejected(reason)``.

    pydicom and the decoders raise many exception types on hostile input; MemoryError is
    kept apart (it becomes ``out-of-memory``, not a verdict on the file's content).
    """
    try:
        yield
    except (DicomRejected, MemoryError):
        raise
    except Exception as exc:  # third-party code: any type is possible on hostile bytes
        raise DicomRejected(reason, f"{what}: {type(exc).__name__}: {exc}", fix) from exc
