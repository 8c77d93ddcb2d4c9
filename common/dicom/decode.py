"""Decoding Pixel Data (7FE0,0010) with a fixed, stated choice of decoder.

pydicom 3.0.2 tries every installed plugin for a transfer syntax, and with python-gdcm
installed it tries GDCM first for JPEG, JPEG-LS and JPEG 2000 (measured: installing
python-gdcm alone changed the decoded pixels of 10 JPEG Baseline files of the corpora). The
order here is medsynth's, not the installation's:

1. native syntaxes: pydicom's own reader; RLE: pydicom's RLE decoder;
2. compressed: the pylibjpeg plugins, then Pillow, each over the whole file (one file is never
   decoded by two decoders, frame by frame), GDCM never at this step;
3. greyscale JPEG Baseline (Process 1) and JPEG Extended (Process 2 and 4) that step 2 refuses:
   GDCM, through pydicom's GDCM pixel data handler (``pydicom.pixel_data_handlers.
   gdcm_handler``; pydicom 3.0.2's newer GDCM plugin refuses 12-bit samples). GDCM's
   IJG-derived codec tolerates what libjpeg rejects, e.g. a sequential scan header (SOS)
   declaring a spectral selection other than Ss = 0, Se = 63 (ITU-T T.81 B.2.3), which old
   12-bit encoders wrote. GDCM prints its complaints to stderr; they are captured and recorded
   as warnings of the file.

Well-formed 12-bit JPEG Extended is decoded by pylibjpeg-libjpeg at step 2.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array

from common.dicom.errors import DicomRejected

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # JPEG Baseline (Process 1)
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # JPEG Extended (Process 2 and 4)
GDCM_FALLBACK_SYNTAXES = frozenset({JPEG_BASELINE, JPEG_EXTENDED})
# pydicom's plugins other than GDCM, in pydicom's own order of registration.
PREFERRED_PLUGINS = ("pylibjpeg", "pillow")
_AGGREGATED = re.compile(r"^Unable to decode as exceptions were raised by all available plugins: [\w-]+: ")
_REEXPORT = ("re-export the image from the PACS or the modality uncompressed (Explicit VR Little "
             "Endian)")


def preferred_plugins(syntax: str) -> tuple[str, ...]:
    """The plugins step 2 tries for ``syntax``: () for native syntaxes (pydicom reads them),
    ("",) where GDCM is not among the installed plugins (pydicom's default choice is then
    the same), else the installed plugins of :data:`PREFERRED_PLUGINS`."""
    decoder = get_decoder(syntax)
    if decoder.is_native:
        return ()
    available = decoder.available_plugins
    if "gdcm" not in available:
        return ("",) if available else ()
    return tuple(name for name in PREFERRED_PLUGINS if name in available)


def gdcm_available() -> bool:
    """Whether python-gdcm is importable (a declared dependency; absent in a broken install)."""
    try:
        from pydicom.pixel_data_handlers import gdcm_handler
    except ImportError:
        return False
    return bool(gdcm_handler.is_available())


def can_decode(syntax: str, samples_per_pixel: int) -> bool:
    """Whether some decoder of this module may read ``syntax``."""
    if get_decoder(syntax).is_native or preferred_plugins(syntax):
        return True
    return syntax in GDCM_FALLBACK_SYNTAXES and samples_per_pixel == 1 and gdcm_available()


def decode_pixel_array(ds: Dataset, syntax: str, syntax_name: str) -> np.ndarray:
    """Decode all frames of ``ds`` following the module's order; ``decode-failed`` when none can."""
    decoder = get_decoder(syntax)
    if decoder.is_native:
        try:
            return np.asarray(pixel_array(ds))
        except (MemoryError, DicomRejected):
            raise
        except Exception as exc:  # pydicom on hostile native data
            raise DicomRejected("decode-failed", f"cannot read the native pixel data: "
                                f"{type(exc).__name__}: {exc}") from exc
    failures: list[str] = []
    for plugin in preferred_plugins(syntax):
        try:
            return np.asarray(pixel_array(ds, decoding_plugin=plugin))
        except MemoryError:
            raise
        except Exception as exc:  # third-party decoders raise any type on hostile bytes
            failures.append(f"{plugin or 'pydicom'}: {_one_line(exc)}")
    if syntax in GDCM_FALLBACK_SYNTAXES and int(ds.get("SamplesPerPixel", 1)) == 1 and gdcm_available():
        try:
            arr = decode_with_gdcm(ds)
        except MemoryError:
            raise
        except Exception as exc:  # GDCM on hostile bytes
            failures.append(f"gdcm: {_one_line(exc)}")
        else:
            warnings.warn(f"decoded by GDCM: {'; '.join(failures)}", stacklevel=2)
            return arr
    raise DicomRejected("decode-failed", f"no installed decoder could read the {syntax_name} frames "
                        f"(damaged data or a coding the decoders refuse): {'; '.join(failures)}",
                        f"open the image in a viewer; if it shows, {_REEXPORT}")


def decode_with_gdcm(ds: Dataset) -> np.ndarray:
    """Frames decoded by GDCM via pydicom's GDCM pixel data handler, GDCM's stderr recorded as
    warnings. Returns the flat array the handler gives (the caller reshapes and checks it)."""
    from pydicom.pixel_data_handlers import gdcm_handler

    with captured_stderr() as said:
        arr = gdcm_handler.get_pixeldata(ds)
    for line in dict.fromkeys(said):
        warnings.warn(f"GDCM: {line}", stacklevel=2)
    return np.asarray(arr)


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Lines written to file descriptor 2 (by native code too) inside the block."""
    lines: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(1 << 16).decode("utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (pydicom's aggregated messages span several)."""
    text = _AGGREGATED.sub("", " ".join(str(exc).split()))
    return text if len(text) <= 300 else text[:297] + "..."
