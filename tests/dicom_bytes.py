"""DICOM files built byte by byte, so tests can state exactly what is wrong with them.

pydicom's writer refuses (or repairs) most of the inconsistencies hostile files carry, so the
hostile-input and fuzz tests encode elements themselves (PS3.5 7.1): tag, VR, length, value.
"""

from __future__ import annotations

import struct

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF


def text(value: str, pad: bytes = b" ") -> bytes:
    """An even-length string value (UI values pad with NUL, the others with a space)."""
    raw = value.encode("ascii")
    return raw + pad * (len(raw) % 2)


def element(group: int, elem: int, vr: bytes, value: bytes, *, endian: str = "<",
            implicit: bool = False, length: int | None = None) -> bytes:
    """One data element; ``length`` overrides the declared length (hostile files lie)."""
    declared = len(value) if length is None else length
    tag = struct.pack(endian + "HH", group, elem)
    if implicit:
        return tag + struct.pack(endian + "I", declared) + value
    if vr in _LONG_VRS:
        return tag + vr + b"\0\0" + struct.pack(endian + "I", declared) + value
    return tag + vr + struct.pack(endian + "H", declared) + value


def item(content: bytes, *, endian: str = "<", length: int | None = None) -> bytes:
    """An Item (FFFE,E000) of defined length (or ``length``, e.g. UNDEFINED)."""
    declared = len(content) if length is None else length
    return struct.pack(endian + "HHI", 0xFFFE, 0xE000, declared) + content


def item_delimiter(endian: str = "<") -> bytes:
    return struct.pack(endian + "HHI", 0xFFFE, 0xE00D, 0)


def sequence_delimiter(endian: str = "<") -> bytes:
    return struct.pack(endian + "HHI", 0xFFFE, 0xE0DD, 0)


def file_meta(transfer_syntax: str | None, sop_class: str = SECONDARY_CAPTURE) -> bytes:
    """A File Meta group (always Explicit VR Little Endian), with its Group Length."""
    body = element(0x0002, 0x0001, b"OB", b"\0\1")
    body += element(0x0002, 0x0002, b"UI", text(sop_class, b"\0"))
    body += element(0x0002, 0x0003, b"UI", text("1.2.826.0.1.3680043.8.498.1", b"\0"))
    if transfer_syntax is not None:
        body += element(0x0002, 0x0010, b"UI", text(transfer_syntax, b"\0"))
    return element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def part10(transfer_syntax: str | None, dataset: bytes, *, preamble: bool = True,
           sop_class: str = SECONDARY_CAPTURE) -> bytes:
    """Preamble + 'DICM' + File Meta + dataset bytes (already encoded as the syntax says)."""
    head = b"\0" * 128 + b"DICM" if preamble else b""
    return head + file_meta(transfer_syntax, sop_class) + dataset


def image_dataset(rows: int, columns: int, *, frames: int = 1, bits: int = 16,
                  photometric: str = "MONOCHROME2", samples: int = 1, pixels: bytes | None = None,
                  endian: str = "<", implicit: bool = False, modality: str = "OT",
                  sop_class: str = SECONDARY_CAPTURE, extra: bytes = b"",
                  pixel_length: int | None = None, patient_id: str = "FUZZ-1",
                  sop_instance_uid: str = "1.2.826.0.1.3680043.8.498.1") -> bytes:
    """A minimal image dataset: SOP, Modality, Patient ID, Image Pixel module, Pixel Data.

    ``extra`` is inserted before the Image Pixel module (tags between (0010,0020) and
    (0028,0002)); ``pixels`` defaults to a ramp of the declared size.
    """
    def el(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
        return element(group, elem, vr, value, endian=endian, implicit=implicit, length=length)

    def us(value: int) -> bytes:
        return struct.pack(endian + "H", value)

    size = rows * columns * frames * samples * max(bits // 8, 1)
    if pixels is None:
        dtype_max = (1 << min(bits, 16)) - 1 if bits > 1 else 255
        pixels = bytes((i * 7) % 256 for i in range(size)) if bits <= 8 else b"".join(
            struct.pack(endian + "H", (i * 37) % (dtype_max + 1)) for i in range(size // 2))
    pixels += b"\0" * (len(pixels) % 2)
    return (
        el(0x0008, 0x0016, b"UI", text(sop_class, b"\0"))
        + el(0x0008, 0x0018, b"UI", text(sop_instance_uid, b"\0"))
        + el(0x0008, 0x0060, b"CS", text(modality))
        + el(0x0010, 0x0020, b"LO", text(patient_id))
        + extra
        + el(0x0028, 0x0002, b"US", us(samples))
        + el(0x0028, 0x0004, b"CS", text(photometric))
        + (el(0x0028, 0x0006, b"US", us(0)) if samples > 1 else b"")
        + el(0x0028, 0x0008, b"IS", text(str(frames)))
        + el(0x0028, 0x0010, b"US", us(rows))
        + el(0x0028, 0x0011, b"US", us(columns))
        + el(0x0028, 0x0100, b"US", us(bits))
        + el(0x0028, 0x0101, b"US", us(min(bits, 16) if bits > 1 else 1))
        + el(0x0028, 0x0102, b"US", us((min(bits, 16) if bits > 1 else 1) - 1))
        + el(0x0028, 0x0103, b"US", us(0))
        + el(0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", pixels, length=pixel_length)
    )
