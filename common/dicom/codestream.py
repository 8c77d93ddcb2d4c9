"""Image size declared inside compressed frames, read before any decoder runs.

The decoded-size cap in ``common.dicom.read`` trusts Rows (0028,0010) / Columns (0028,0011), but a
JPEG or JPEG 2000 decoder allocates what its own codestream header declares. A frame whose
codestream disagrees with the DICOM header is refused here, so the cap holds for the decoder
too. Headers read:

* JPEG (ITU-T T.81 B.2.2) and JPEG-LS (ITU-T T.87 C.2.2): the SOFn / SOF55 segment's
  Y (lines), X (samples per line) and Nf (components).
* JPEG 2000 / HTJ2K (ITU-T T.800 A.5.1): the SIZ segment's Xsiz - XOsiz, Ysiz - YOsiz, Csiz;
  a JP2 wrapper (not allowed by PS3.5 A.4.4 but seen) is searched for the codestream.

Fragments that start neither codestream are continuation fragments and are not inspected.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from common.dicom.errors import DicomRejected

_ITEM = b"\xfe\xff\x00\xe0"
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (T.81 Table B.1) and SOF55 (JPEG-LS).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                          0xCF, 0xF7})
_JP2_SEARCH_BYTES = 4096


class CodestreamSize(NamedTuple):
    rows: int
    columns: int
    components: int


def iter_fragments(encapsulated: bytes) -> Iterator[bytes]:
    """Fragments of encapsulated Pixel Data (PS3.5 A.4), after the Basic Offset Table item."""
    pos, first = 0, True
    while pos + 8 <= len(encapsulated):
        if encapsulated[pos:pos + 4] != _ITEM:
            raise DicomRejected("malformed", f"Pixel Data item tag expected at fragment byte {pos}")
        length = struct.unpack_from("<I", encapsulated, pos + 4)[0]
        if not first:
            yield encapsulated[pos + 8:pos + 8 + length]
        first = False
        pos += 8 + length


def jpeg_frame_size(fragment: bytes) -> CodestreamSize | None:
    """Y, X, Nf of the first SOFn/SOF55 segment; None when the scan starts first (no SOF)."""
    pos = 2
    while pos + 4 <= len(fragment):
        if fragment[pos] != 0xFF:
            return None
        marker = fragment[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", fragment, pos + 2)[0]
        if marker in _SOF_MARKERS:
            if pos + 10 > len(fragment):
                return None
            rows, columns = struct.unpack_from(">HH", fragment, pos + 5)
            return CodestreamSize(rows, columns, fragment[pos + 9])
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def j2k_frame_size(fragment: bytes) -> CodestreamSize | None:
    """Width, height and components from the SIZ segment (T.800 A.5.1)."""
    start = fragment.find(_J2K_SOC_SIZ, 0, _JP2_SEARCH_BYTES)
    if start < 0 or start + 42 > len(fragment):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", fragment, start + 8)
    components = struct.unpack_from(">H", fragment, start + 40)[0]
    return CodestreamSize(ysiz - yosiz, xsiz - xosiz, components)


def codestream_size(fragment: bytes) -> CodestreamSize | None:
    """The declared size of a JPEG, JPEG-LS or JPEG 2000 codestream, else None."""
    if fragment.startswith(_JPEG_SOI):
        return jpeg_frame_size(fragment)
    if fragment.startswith(_J2K_SOC_SIZ) or fragment.startswith(_JP2_SIGNATURE):
        return j2k_frame_size(fragment)
    return None


def check_codestream_sizes(encapsulated: bytes, rows: int, columns: int, samples: int) -> None:
    """Refuse a frame whose codestream declares another size than the DICOM header.

    A JPEG height of 0 (defined later by a DNL segment, T.81 B.2.5) is refused too: the decoder
    could not be bounded.
    """
    for index, fragment in enumerate(iter_fragments(encapsulated)):
        size = codestream_size(fragment)
        if size is None:
            continue
        if (size.rows, size.columns) != (rows, columns) or size.components != samples:
            raise DicomRejected(
                "decode-failed",
                f"fragment {index} declares a {size.rows}x{size.columns} codestream with "
                f"{size.components} components but the header declares {rows}x{columns} with "
                f"{samples} samples; refused before decoding",
            )
