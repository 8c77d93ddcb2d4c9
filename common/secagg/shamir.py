"""t-of-n Shamir secret sharing of 32-byte secrets over the Mersenne prime field GF(2^521 - 1).

Used for both secrets a site shares in Bonawitz et al. (CCS 2017, §4): the mask key s_u (shared
once per setup) and the per-round self-mask seed b_u. A secret S (32 bytes, read big-endian as
an integer < 2^256 < p) is the constant term of a random polynomial of degree t-1

    f(X) = S + a_1 X + ... + a_{t-1} X^{t-1}   (mod p),   a_i uniform in [0, p) from ``secrets``

and party i (0-based, in sorted site order) receives the share (x, y) = (i + 1, f(i + 1)). Any t
shares determine f by Lagrange interpolation; any t-1 are uniformly distributed and independent
of S (Shamir, CACM 1979). p = 2^521 - 1 is prime, larger than every secret, and has a fixed
66-byte encoding, so shares need no per-deployment parameters.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from common.secagg.errors import InconsistentShares

PRIME = 2**521 - 1
Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 4 + Y_BYTES  # u32 x || y
SECRET_BYTES = 32


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of a sharing polynomial; x >= 1 (x = 0 would be the secret itself)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if isinstance(self.x, bool) or not isinstance(self.x, int) or not 1 <= self.x < 2**32:
            raise ValueError(f"share x must be an integer in [1, 2**32), got {self.x!r}")
        if isinstance(self.y, bool) or not isinstance(self.y, int) or not 0 <= self.y < PRIME:
            raise ValueError("share y must be an integer in [0, 2**521 - 1)")

    def to_bytes(self) -> bytes:
        """70 bytes: x as u32 big-endian, then y as 66 bytes big-endian."""
        return struct.pack(">I", self.x) + self.y.to_bytes(Y_BYTES, "big")

    @staticmethod
    def from_bytes(b: bytes) -> Share:
        if len(b) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(b)}")
        (x,) = struct.unpack(">I", b[:4])
        return Share(int(x), int.from_bytes(b[4:], "big"))


def check_threshold(threshold: int, n: int) -> None:
    """Sharing parameters the field math needs: 1 <= t <= n (protocol rules live in ``session``)."""
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold must be in [1, n={n}], got {threshold}")


def split_secret(secret: bytes, n: int, threshold: int) -> list[Share]:
    """Shares for x = 1..n of ``secret`` (32 bytes); any ``threshold`` of them reconstruct it."""
    return split_secret_at(secret, range(1, n + 1), threshold)


def split_secret_at(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Shares of ``secret`` (32 bytes) at the distinct points ``xs`` (each >= 1), in that order.

    On a sparse graph (``graph``) a site shares only among its neighbourhood, each holder at
    its global point (sorted participant index + 1), so a share's x still names its holder.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"evaluation points must be distinct, got {sorted(xs)}")
    check_threshold(threshold, len(xs))
    # coeffs[k] is the coefficient of X^k; coeffs[0] = S
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner: y = (...(a_{t-1} x + a_{t-2}) x + ...) x + S
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def interpolate(points: Sequence[Share], at: int) -> int:
    """f(at) for the unique polynomial of degree < len(points) through ``points`` (Lagrange, mod p).

    f(z) = Σ_i y_i Π_{j≠i} (z - x_j) / (x_i - x_j)
    """
    xs = [p.x for p in points]
    if len(set(xs)) != len(xs):
        raise InconsistentShares(f"shares with repeated evaluation points {sorted(xs)}: a reply was duplicated")
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct_secret(shares: Sequence[Share], threshold: int, *, what: str = "secret") -> bytes:
    """The 32-byte secret from >= ``threshold`` shares; extra shares must lie on the same polynomial.

    The first ``threshold`` shares (by x) fix f; every further share is checked against f, so a
    site that sent a corrupted share is detected rather than silently producing a wrong sum.
    ``what`` names the secret in error messages (e.g. "self-mask seed of site-b").
    """
    if len(shares) < threshold:
        raise ValueError(f"{what}: need {threshold} shares, have {len(shares)}")
    ordered = sorted(shares, key=lambda s: s.x)
    base = ordered[:threshold]
    for extra in ordered[threshold:]:
        if interpolate(base, extra.x) != extra.y:
            raise InconsistentShares(f"{what}: share at x={extra.x} is not on the polynomial of the others")
    value = interpolate(base, 0)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise InconsistentShares(f"{what}: shares reconstruct to a value wider than {SECRET_BYTES} bytes")
    return value.to_bytes(SECRET_BYTES, "big")
