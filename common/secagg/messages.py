"""Messages a site sends to the server during a round, with byte encodings for transport.

* ``MaskedInput`` (Bonawitz et al., CCS 2017, round 2 "MaskedInputCollection"): the masked
  vector y_u and the encrypted shares of this round's self-mask seed b_u, one per receiver.
* ``UnmaskReply`` (round 4 "Unmasking"): plaintext shares the site decrypted for the server:
  b-shares of sites that sent y (alive), s-shares of sites that did not (dead), never both for
  one site.

Encodings are ``encoding.Writer`` layouts; y travels as little-endian uint64 bytes (8·L).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.secagg.encoding import Reader, Writer
from common.secagg.shamir import Share

MASKED_TAG = b"medsynth-secagg masked-input v1"
REPLY_TAG = b"medsynth-secagg unmask-reply v1"


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """y: (L,) uint64, x_u + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^64; b_share_cts: receiver → ciphertext."""

    y: np.ndarray
    b_share_cts: dict[str, bytes]

    def to_bytes(self) -> bytes:
        """str(tag) u64(k) [str(receiver) bytes(ct)]×k bytes(y as <u8)."""
        w = Writer(MASKED_TAG).put_u64(len(self.b_share_cts))
        for receiver in sorted(self.b_share_cts):
            w.put_str(receiver).put_bytes(self.b_share_cts[receiver])
        return w.put_bytes(np.ascontiguousarray(self.y, dtype="<u8").tobytes()).done()

    @staticmethod
    def from_bytes(b: bytes) -> MaskedInput:
        r = Reader(b, MASKED_TAG)
        cts = _read_map(r)
        raw = r.get_bytes()
        r.done()
        if len(raw) % 8:
            raise ValueError(f"masked vector of {len(raw)} bytes is not a whole number of uint64 words")
        return MaskedInput(np.frombuffer(raw, dtype="<u8").astype(np.uint64), cts)


@dataclass(frozen=True)
class UnmaskReply:
    """site → Share: b_shares for alive sites, s_shares for dead ones (disjoint key sets)."""

    b_shares: dict[str, Share]
    s_shares: dict[str, Share]

    def to_bytes(self) -> bytes:
        """str(tag) then, for b then s: u64(k) [str(site) bytes(share)]×k."""
        w = Writer(REPLY_TAG)
        for shares in (self.b_shares, self.s_shares):
            w.put_u64(len(shares))
            for site in sorted(shares):
                w.put_str(site).put_bytes(shares[site].to_bytes())
        return w.done()

    @staticmethod
    def from_bytes(b: bytes) -> UnmaskReply:
        r = Reader(b, REPLY_TAG)
        b_shares = {site: Share.from_bytes(raw) for site, raw in _read_map(r).items()}
        s_shares = {site: Share.from_bytes(raw) for site, raw in _read_map(r).items()}
        r.done()
        return UnmaskReply(b_shares, s_shares)


def _read_map(r: Reader) -> dict[str, bytes]:
    """u64(k) [str(key) bytes(value)]×k; a repeated key is malformed (it would hide an entry)."""
    out: dict[str, bytes] = {}
    for _ in range(r.get_u64()):
        key = r.get_str()
        if key in out:
            raise ValueError(f"site {key!r} appears twice in one message")
        out[key] = r.get_bytes()
    return out
