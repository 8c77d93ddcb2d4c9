"""The byte structure of a DICOM file, checked before pydicom parses anything.

pydicom trusts declared lengths: a truncated file loads silently, an element declaring 4 GiB
makes it try to read 4 GiB, a deflated dataset is inflated whole. :func:`check_part10` walks
the file's elements itself, within the bytes that are really there, and raises
:class:`DicomRejected` on the first inconsistency:

* Part 10 framing (PS3.10 7.1): 128-byte preamble, "DICM", File Meta Information group
  (0002,xxxx) in Explicit VR Little Endian with a Transfer Syntax UID (0002,0010). A File Meta
  group without the preamble is accepted (some exporters omit it). A bare dataset (no File Meta
  at all, as older archives hold them) is accepted only when the walk proves it is one
  (:func:`check_bare_dataset`); pydicom then gets it with a File Meta group added.
* Trailing zero padding: zero bytes after the last top-level element (some archives pad files
  to a block size, by megabytes) are cut off with a warning; they are not an element.
* Data elements (PS3.5 7.1): known two-letter VRs, 2- or 4-byte lengths, every defined length
  within its parent (the file, a sequence, an item), undefined lengths only where allowed and
  closed by their delimiters (PS3.5 7.5), nesting depth and element count capped.
* Encapsulated Pixel Data (PS3.5 A.4): fragments are items of defined length closed by a
  Sequence Delimitation Item, and no fragment may contain the delimiter's bytes (pydicom finds
  the end of such a value by searching for them).
* Deflated Explicit VR Little Endian (PS3.5 A.5): inflated incrementally and abandoned as soon
  as the output exceeds the cap (a deflate bomb never reaches pydicom).

The result is the byte string pydicom should parse: the original bytes, or a rebuilt file
with a preamble (and, for a bare dataset, a File Meta group) added, the trailing zero padding
cut off, and/or the dataset inflated (its File Meta then declares Explicit VR Little Endian,
which is what an inflated dataset is). What was repaired is reported with ``warnings.warn``.
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from common.dicom.errors import DicomRejected

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_VR_LE = "1.2.840.10008.1.2.1.99"

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"})
_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
                    b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_MAX_META_BYTES = 1 << 20
_INFLATE_CHUNK = 1 << 20
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_SOP_CLASS_UID = 0x00080016
# Transfer syntaxes added to DICOM (PS3.5 Table A-1, PS3.6) after pydicom 3.0.2 was released:
# real syntaxes that the installed pydicom neither parses nor decodes.
NEWER_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}
_SYNTAX_NAMES = {IMPLICIT_VR_LE: "Implicit VR Little Endian", EXPLICIT_VR_LE: "Explicit VR Little Endian",
                 EXPLICIT_VR_BE: "Explicit VR Big Endian"}


@dataclass(frozen=True)
class StructureLimits:
    """Caps on what a file may make the walker (and then pydicom) do."""

    max_inflated_bytes: int = 512 * 2**20  # inflated size of a deflated dataset
    max_value_bytes: int = 512 * 2**20  # any one element or item (no accepted file is larger)
    max_depth: int = 32  # nested sequences / items
    max_elements: int = 2_000_000  # data elements, all levels together


class Part10(NamedTuple):
    """A structurally valid file: the bytes for pydicom and what the walk found."""

    data: bytes  # preamble + "DICM" + File Meta + dataset, ready for ``dcmread``
    transfer_syntax: str  # Transfer Syntax UID (0002,0010) as declared
    pixel_data_length: int | None  # top-level Pixel Data value length; None when absent


class _Encoding(NamedTuple):
    implicit: bool
    endian: str  # "<" or ">"


def check_part10(data: bytes, limits: StructureLimits) -> Part10:
    """Validate ``data`` as a DICOM Part 10 file and return what pydicom should parse."""
    meta_start = locate_file_meta(data)
    if meta_start is None:
        return check_bare_dataset(data, limits)
    meta_end, meta = read_file_meta(data, meta_start)
    if not meta:
        raise DicomRejected("not-dicom", "'DICM' is not followed by a File Meta group (0002,xxxx)")
    if _TRANSFER_SYNTAX not in meta:
        raise DicomRejected("missing-transfer-syntax", "the File Meta group has no Transfer Syntax "
                            "UID (0002,0010): the encoding of the dataset is unknown")
    start, end = meta[_TRANSFER_SYNTAX]
    syntax = data[start:end].rstrip(b"\0 ").decode("ascii", errors="replace").strip()
    encoding = _dataset_encoding(syntax)
    if syntax == DEFLATED_VR_LE:
        inflated = inflate_dataset(memoryview(data)[meta_end:], limits.max_inflated_bytes)
        walker = _Walker(inflated, limits)
        end = walker.walk_dataset(0, len(inflated), encoding, depth=0, in_item=False)
        rebuilt = _PREAMBLE + rewrite_transfer_syntax(data[meta_start:meta_end], EXPLICIT_VR_LE)
        return Part10(rebuilt + cut_zero_padding(inflated, end), syntax, walker.pixel_data_length)
    walker = _Walker(data, limits)
    end = walker.walk_dataset(meta_end, len(data), encoding, depth=0, in_item=False)
    data = cut_zero_padding(data, end)
    if meta_start == 0:
        data = _PREAMBLE + data
    return Part10(data, syntax, walker.pixel_data_length)


_PREAMBLE = b"\0" * 128 + b"DICM"


def locate_file_meta(data: bytes) -> int | None:
    """Offset of the File Meta group: 132 after preamble + "DICM", 0 when it starts the file,
    None when there is none (an empty file is refused here)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return 132
    if data[:2] == b"\x02\x00" and data[4:6] in _VRS:
        return 0  # File Meta group without the preamble: tolerated
    if not data:
        raise DicomRejected("not-dicom", "an empty file")
    return None


def cut_zero_padding(data: bytes, end: int) -> bytes:
    """``data`` up to ``end``, the end of the last top-level element; what follows is zeros
    (the walk stopped there only because it was), cut off with a warning."""
    if end == len(data):
        return data
    warnings.warn(f"{len(data) - end} bytes of zero padding after the last data element (at byte "
                  f"{end}) were ignored", stacklevel=3)
    return data[:end]


def check_bare_dataset(data: bytes, limits: StructureLimits) -> Part10:
    """A dataset without preamble and File Meta (PS3.10 7.1 requires both; older archives omit
    them), accepted only when its structure proves it is a DICOM dataset:

    * it starts with an element of group 0008 (Identifying; (0008,0005) Specific Character Set
      or (0008,0016) SOP Class UID come first in any composite object), which fixes the byte
      order, and its first VR bytes fix explicit or implicit VR (pydicom's rule; big endian
      only with explicit VR, PS3.5 A.3);
    * every element, item and length is consistent up to the end of the file (zero padding
      aside), with the top-level tags strictly ascending (PS3.5 7.1) and a SOP Class UID
      (0008,0016) among them.

    Anything less is ``not-dicom``. The result is given a File Meta group declaring the syntax
    found, so pydicom parses it without guessing.
    """
    if data[:2] == b"\x08\x00":
        endian = "<"
    elif data[:2] == b"\x00\x08" and data[4:6] in _VRS:
        endian = ">"
    else:
        raise DicomRejected("not-dicom", "no 128-byte preamble + 'DICM', no File Meta group, and "
                            "it does not start like a DICOM dataset (group 0008): not a DICOM file "
                            "(PS3.10 7.1)")
    implicit = endian == "<" and data[4:6] not in _VRS
    syntax = IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE if endian == "<" else EXPLICIT_VR_BE
    walker = _Walker(data, limits, bare=True)
    try:
        end = walker.walk_dataset(0, len(data), _Encoding(implicit, endian), depth=0, in_item=False)
        if not walker.has_sop_class:
            raise DicomRejected("not-dicom", "no SOP Class UID (0008,0016)")
    except DicomRejected as exc:
        raise DicomRejected("not-dicom", f"no File Meta header, and not a valid bare {_SYNTAX_NAMES[syntax]} "
                            f"dataset either ({exc.message})") from exc
    warnings.warn(f"no File Meta Information header (PS3.10 7.1): read as a bare {_SYNTAX_NAMES[syntax]} "
                  "dataset", stacklevel=2)
    return Part10(_PREAMBLE + build_file_meta(syntax) + cut_zero_padding(data, end), syntax,
                  walker.pixel_data_length)


def build_file_meta(syntax: str) -> bytes:
    """A minimal File Meta group (Explicit VR Little Endian): Group Length (0002,0000), File Meta
    Information Version (0002,0001) and Transfer Syntax UID (0002,0010)."""
    uid = syntax.encode("ascii")
    uid += b"\0" * (len(uid) % 2)
    body = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\0\1"
    body += struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(uid)) + uid
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def read_file_meta(data: bytes, start: int) -> tuple[int, dict[int, tuple[int, int]]]:
    """Walk group 0002 (Explicit VR Little Endian): its end and tag -> (value start, value end)."""
    found: dict[int, tuple[int, int]] = {}
    pos = start
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4:pos + 6]
        if vr not in _VRS:
            raise DicomRejected("malformed", f"File Meta element (0002,{element:04X}) has invalid "
                                f"VR {vr!r}")
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise DicomRejected("truncated", "the file ends inside the File Meta group")
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        end = pos + header + length
        if length == _UNDEFINED or end > len(data) or end - start > _MAX_META_BYTES:
            raise DicomRejected("truncated" if end > len(data) and length != _UNDEFINED else "malformed",
                                f"File Meta element (0002,{element:04X}) declares {length} bytes")
        found[0x00020000 | element] = (pos + header, end)
        pos = end
    return pos, found


def inflate_dataset(deflated: memoryview, cap: int) -> bytes:
    """Inflate a raw deflate stream (PS3.5 A.5) in chunks, never producing more than ``cap`` bytes."""
    inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
    parts: list[bytes] = []
    total = 0
    pending = bytes(deflated)
    try:
        while pending and not inflater.eof:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            total += len(chunk)
            if total > cap:
                raise DicomRejected("inflated-too-large", f"the deflated dataset inflates to more than "
                                    f"{cap} bytes (cap); a deflate bomb or an oversized export")
            parts.append(chunk)
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DicomRejected("malformed", f"the deflated dataset is not a valid deflate stream: {exc}") from exc
    if not inflater.eof:
        raise DicomRejected("truncated", "the deflated dataset ends before its deflate stream does")
    return b"".join(parts)


def rewrite_transfer_syntax(meta: bytes, syntax: str) -> bytes:
    """Re-encode a File Meta group with another Transfer Syntax UID and no Group Length."""
    out = bytearray()
    pos = 0
    value = syntax.encode("ascii")
    value += b"\0" * (len(value) % 2)
    while pos < len(meta):
        element = struct.unpack_from("<H", meta, pos + 2)[0]
        long_vr = meta[pos + 4:pos + 6] in _LONG_VRS
        length = struct.unpack_from("<I" if long_vr else "<H", meta, pos + (8 if long_vr else 6))[0]
        end = pos + (12 if long_vr else 8) + length
        if element == 0x0010:
            out += meta[pos:pos + 6] + struct.pack("<H", len(value)) + value
        elif element != 0x0000:  # (0002,0000) Group Length would be stale; pydicom does not need it
            out += meta[pos:end]
        pos = end
    return bytes(out)


def _dataset_encoding(syntax: str) -> _Encoding:
    """The dataset encoding a transfer syntax implies; unknown syntaxes are refused."""
    if syntax == IMPLICIT_VR_LE:
        return _Encoding(True, "<")
    if syntax == EXPLICIT_VR_BE:
        return _Encoding(False, ">")
    if syntax in (EXPLICIT_VR_LE, DEFLATED_VR_LE) or (_UID_PATTERN.fullmatch(syntax)
                                                      and UID(syntax).is_transfer_syntax):
        return _Encoding(False, "<")
    version = pydicom.__version__
    if syntax in NEWER_TRANSFER_SYNTAXES:
        raise DicomRejected("unsupported-transfer-syntax", f"Transfer Syntax UID (0002,0010) {syntax} is "
                            f"{NEWER_TRANSFER_SYNTAXES[syntax]}, a DICOM transfer syntax newer than the "
                            f"installed pydicom {version}, which can neither read nor decode it",
                            f"re-export it from the PACS in a syntax pydicom {version} reads: Explicit VR "
                            "Little Endian, or JPEG 2000 / JPEG-LS lossless")
    raise DicomRejected("unsupported-transfer-syntax", f"Transfer Syntax UID (0002,0010) {syntax!r} "
                        f"is not a transfer syntax DICOM defines (as known to pydicom {version}): a "
                        "private or damaged UID")


class _Walker:
    """One pass over the dataset's elements; raises on the first structural fault."""

    def __init__(self, buf: bytes, limits: StructureLimits, *, bare: bool = False) -> None:
        self.buf = buf
        self.limits = limits
        self.elements = 0
        self.pixel_data_length: int | None = None
        self.bare = bare  # a dataset without File Meta: top-level tags must ascend
        self.has_sop_class = False  # a top-level SOP Class UID (0008,0016) was seen

    def _fail(self, reason: str, pos: int, what: str) -> DicomRejected:
        return DicomRejected(reason, f"{what} at byte {pos}")

    def _overrun(self, pos: int, end: int, length: int, what: str) -> DicomRejected:
        """A value running past ``end``: the file was cut (``truncated``) or the length lies."""
        cut = end == len(self.buf) and length <= self.limits.max_value_bytes
        return self._fail("truncated" if cut else "malformed", pos, what)

    def _is_implicit(self, pos: int, end: int, enc: _Encoding, nested: bool) -> bool:
        """pydicom's rule: a dataset whose first VR bytes are not two capitals is implicit VR;
        items of an implicit VR sequence stay implicit."""
        if enc.implicit and nested:
            return True
        if pos + 6 > end:
            return enc.implicit
        vr = self.buf[pos + 4:pos + 6]
        return not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)

    def walk_dataset(self, pos: int, end: int, enc: _Encoding, *, depth: int, in_item: bool,
                     nested: bool = False) -> int:
        """Walk elements from ``pos`` to ``end`` (or to an Item Delimitation when ``in_item``).

        Returns where the walk ended: ``end``, after the Item Delimitation, or, at the top level,
        where only zero bytes remain (trailing padding, not elements).
        """
        enc = _Encoding(self._is_implicit(pos, end, enc, nested or in_item), enc.endian)
        buf, tag_fmt = self.buf, enc.endian + "HH"
        top_level = depth == 0 and not in_item and not nested
        previous = -1
        while pos < end:
            if top_level and buf[pos] == 0 and buf.count(b"\0", pos, end) == end - pos:
                return pos  # only zeros left: padding after the last element
            if pos + 8 > end:
                raise self._fail("truncated", pos, f"{end - pos} stray bytes where an element starts")
            group, element = struct.unpack_from(tag_fmt, buf, pos)
            tag = group << 16 | element
            if tag == _ITEM_END and in_item:
                return pos + 8
            if top_level and self.bare:
                if tag <= previous:
                    raise self._fail("malformed", pos, f"({group:04X},{element:04X}) after "
                                     f"({previous >> 16:04X},{previous & 0xFFFF:04X}): tags not ascending")
                previous = tag
                self.has_sop_class |= tag == _SOP_CLASS_UID
            if group == 0xFFFE:
                raise self._fail("malformed", pos, f"delimiter ({group:04X},{element:04X}) out of place")
            self.elements += 1
            if self.elements > self.limits.max_elements:
                raise self._fail("malformed", pos, f"more than {self.limits.max_elements} elements")
            vr, length, header = self._element_header(pos, end, enc, tag)
            value = pos + header
            if length == _UNDEFINED:
                pos = self._walk_undefined(value, end, enc, tag, vr, depth)
                continue
            if value + length > end:
                raise self._overrun(pos, end, length, f"element ({group:04X},{element:04X}) declares "
                                    f"{length} bytes, only {end - value} remain")
            if depth == 0 and tag == _PIXEL_DATA:
                self.pixel_data_length = length
            if length and (vr == b"SQ" or (vr is None and _dictionary_is_sequence(tag))):
                self._walk_items(value, value + length, enc, depth + 1, defined=True, fragments=False)
            pos = value + length
        if in_item:
            raise self._overrun(pos, end, 0, "an item of undefined length has no Item Delimitation")
        return pos

    def _element_header(self, pos: int, end: int, enc: _Encoding, tag: int) -> tuple[bytes | None, int, int]:
        """(VR or None when implicit, value length, header size) of the element at ``pos``."""
        if enc.implicit:
            return None, struct.unpack_from(enc.endian + "I", self.buf, pos + 4)[0], 8
        vr = self.buf[pos + 4:pos + 6]
        if vr not in _VRS:
            raise self._fail("malformed", pos, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has "
                             f"invalid VR {vr!r}")
        if vr not in _LONG_VRS:
            return vr, struct.unpack_from(enc.endian + "H", self.buf, pos + 6)[0], 8
        if pos + 12 > end:
            raise self._fail("truncated", pos, "the file ends inside an element header")
        return vr, struct.unpack_from(enc.endian + "I", self.buf, pos + 8)[0], 12

    def _walk_undefined(self, value: int, end: int, enc: _Encoding, tag: int, vr: bytes | None,
                        depth: int) -> int:
        """An undefined-length value: a sequence (SQ, UN, implicit) or encapsulated Pixel Data."""
        if vr not in (None, b"SQ", b"UN", b"OB", b"OW"):
            raise self._fail("malformed", value, f"VR {vr!r} cannot have undefined length")
        pixel_data = depth == 0 and tag == _PIXEL_DATA
        fragments = pixel_data and vr in (None, b"OB", b"OW")
        if vr in (b"OB", b"OW") and not pixel_data:
            raise self._fail("malformed", value, f"undefined-length {vr!r} element "
                             f"({tag >> 16:04X},{tag & 0xFFFF:04X}) other than Pixel Data")
        after = self._walk_items(value, end, enc, depth + 1, defined=False, fragments=fragments)
        if fragments:
            self.pixel_data_length = _UNDEFINED
            delimiter = struct.pack(enc.endian + "HH", 0xFFFE, 0xE0DD)
            if self.buf.find(delimiter, value, after - 8) >= 0:
                raise self._fail("malformed", value, "a Pixel Data fragment contains the Sequence "
                                 "Delimitation bytes (FFFE,E0DD)")
        return after

    def _walk_items(self, pos: int, end: int, enc: _Encoding, depth: int, *, defined: bool,
                    fragments: bool) -> int:
        """Items (FFFE,E000) up to ``end`` (defined) or to a Sequence Delimitation (undefined)."""
        if depth > self.limits.max_depth:
            raise self._fail("malformed", pos, f"sequences nested deeper than {self.limits.max_depth}")
        fmt = enc.endian + "HHI"
        while True:
            if defined and pos == end:
                return pos
            if pos + 8 > end:
                raise self._overrun(pos, end, 0, "a sequence ends without its Sequence Delimitation")
            group, element, length = struct.unpack_from(fmt, self.buf, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END and not defined:
                return pos + 8
            if tag != _ITEM:
                raise self._fail("malformed", pos, f"({group:04X},{element:04X}) where an Item was expected")
            if length == _UNDEFINED:
                if fragments:
                    raise self._fail("malformed", pos, "a Pixel Data fragment of undefined length")
                pos = self.walk_dataset(pos + 8, end, enc, depth=depth, in_item=True)
                continue
            if pos + 8 + length > end:
                raise self._overrun(pos, end, length, f"an item declares {length} bytes, only "
                                    f"{end - pos - 8} remain")
            if not fragments and length:
                self.walk_dataset(pos + 8, pos + 8 + length, enc, depth=depth, in_item=False, nested=True)
            pos += 8 + length


def _dictionary_is_sequence(tag: int) -> bool:
    """Whether the data dictionary knows ``tag`` as a sequence (implicit VR carries no VR)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False
