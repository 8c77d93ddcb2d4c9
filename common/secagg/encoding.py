"""Canonical, unambiguous byte encodings for signatures, HKDF ``info`` and AEAD associated data.

Every variable-length field is length-prefixed, so two different field tuples never encode to
the same bytes (``("ab", "c")`` vs ``("a", "bc")``): a signature or key derived over one tuple
can never be reinterpreted as another. Layout of each field:

* ``u64``: 8 bytes, big-endian, unsigned (run ids, setup ids, rounds);
* ``bytes``/``str``: 4-byte big-endian length, then the bytes (strings as UTF-8).
"""

from __future__ import annotations

import struct

U64_MAX = 2**64 - 1
MAX_FIELD = 2**32 - 1
MAX_SITE_ID_BYTES = 256


def check_u64(name: str, value: int) -> int:
    """``value`` if it is an ``int`` (not ``bool``) in [0, 2^64); else ``ValueError`` naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return value


def check_site_id(site_id: str) -> str:
    """A site id is a non-empty string of at most 256 UTF-8 bytes (ids are compared as strings)."""
    if not isinstance(site_id, str) or not site_id or len(site_id.encode()) > MAX_SITE_ID_BYTES:
        raise ValueError(f"site id must be a non-empty string of <= {MAX_SITE_ID_BYTES} UTF-8 bytes, got {site_id!r}")
    return site_id


class Writer:
    """Append-only builder of a canonical encoding."""

    def __init__(self, tag: bytes | None = None) -> None:
        self._parts: list[bytes] = []
        if tag is not None:
            self.put_bytes(tag)

    def put_u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", check_u64("field", value)))
        return self

    def put_bytes(self, value: bytes) -> Writer:
        if len(value) > MAX_FIELD:
            raise ValueError(f"field of {len(value)} bytes exceeds the 4-byte length prefix")
        self._parts.append(struct.pack(">I", len(value)))
        self._parts.append(bytes(value))
        return self

    def put_str(self, value: str) -> Writer:
        return self.put_bytes(value.encode())

    def done(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads what ``Writer`` wrote; any truncation, excess or wrong tag is a ``ValueError``."""

    def __init__(self, data: bytes, tag: bytes | None = None) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        if tag is not None and self.get_bytes() != tag:
            raise ValueError(f"not a {tag.decode(errors='replace')!r} encoding (wrong or missing tag)")

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError(f"truncated encoding: need {n} bytes at offset {self._pos}, have {len(self._data)}")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def get_u64(self) -> int:
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value

    def get_bytes(self) -> bytes:
        (n,) = struct.unpack(">I", self._take(4))
        return self._take(int(n))

    def get_str(self) -> str:
        return self.get_bytes().decode()

    def done(self) -> None:
        if self._pos != len(self._data):
            raise ValueError(f"{len(self._data) - self._pos} trailing bytes after the encoding")
