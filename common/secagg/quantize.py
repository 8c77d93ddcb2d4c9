"""Fixed-point quantization of float updates into the ring Z_{2^64} that secure aggregation sums in.

Masks are uniform in Z_{2^64}, so the protocol sums integers mod 2^64 (Bonawitz et al., CCS 2017,
§3 work with Z_R for the same reason). Each element i has a public symmetric bound B_i and is
mapped onto N + 1 evenly spaced levels, N = 2^bits - 1:

    encode:  q_i = round((x_i + B_i) · N / (2 B_i))          ∈ [0, N]   (round half to even)
    decode:  Σ_u x_u,i ≈ total_i · 2 B_i / N - count · B_i    where total_i = Σ_u q_u,i

The sum of ``count`` encodings is < count·2^bits, so it is exact mod 2^64 while
count ≤ ⌊(2^64 - 1) / N⌋ (= 2^16 for 48 bits). A value outside [-B_i, B_i] raises
``ValueOutOfRange``: silently clipping would bias the sum without anyone noticing (clip in the
training code, where the clipping is part of the DP analysis, instead).

Rounding is exact, not merely float-accurate: levels are computed in float64, the elements within
float error of a half-level again in extended precision, and the few still ambiguous with
``fractions.Fraction``, so each |dequantized - x| ≤ B_i / N holds exactly and ``max_error`` is a
true bound. (Where ``np.longdouble`` is plain double, or bits > 53, more elements take the exact
path: slower, still correct.)
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from common.secagg.errors import ValueOutOfRange

RING_BITS = 64
_EPS_LD = float(np.finfo(np.longdouble).eps)  # 2^-63 on x86-64 Linux; 2^-52 where longdouble is double
_EPS_64 = float(np.finfo(np.float64).eps)


class Quantizer:
    """Per-element symmetric bounds ``bounds`` (L,) > 0 and ``bits`` bits per level (1..63)."""

    def __init__(self, bounds: np.ndarray, bits: int = 48) -> None:
        b = np.array(bounds, dtype=np.float64)  # (L,), own copy
        if b.ndim != 1 or b.size == 0:
            raise ValueError(f"bounds must be a non-empty 1-D array, got shape {b.shape}")
        if not np.all(np.isfinite(b) & (b > 0)):
            i = int(np.argmax(~(np.isfinite(b) & (b > 0))))
            raise ValueError(f"bounds must be finite and > 0; bounds[{i}] = {float(b[i])!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits < RING_BITS:
            raise ValueError(f"bits must be an int in [1, 63], got {bits!r}")
        b.setflags(write=False)
        self.bounds = b
        self.bits = bits
        self.levels = 2**bits - 1  # N: the top level
        self.max_count = (2**RING_BITS - 1) // self.levels  # largest exact sum of encodings mod 2^64

    @property
    def length(self) -> int:
        return int(self.bounds.shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(L,) float → (L,) uint64 levels; ``ValueOutOfRange`` names the first bad index and value."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.bounds.shape:
            raise ValueError(f"expected shape {self.bounds.shape}, got {x.shape}")
        bad = ~np.isfinite(x) | (np.abs(x) > self.bounds)
        if bad.any():
            i = int(np.argmax(bad))
            value, bound = float(x[i]), float(self.bounds[i])
            raise ValueOutOfRange(
                f"element {i} = {value!r} is outside its bound [-{bound!r}, {bound!r}] "
                "(or not finite); clip or rescale the update before quantizing"
            )
        # tiers: float64 for all, extended precision where float64 might misround, exact rationals
        # where even that might. A tier's real level v comes from 3 correctly rounded operations, so
        # |v - v_true| ≤ 3·(eps/2)·N (+O(eps²)), and rint(v) is certain unless v lies within
        # 2 eps·N of a half-integer (at 48 bits: 1/8 of a level in float64, 2^-14 in x86 long double).
        levels = np.empty(self.length, dtype=np.uint64)  # (L,)
        todo = np.arange(self.length)  # indices whose level is not certain yet
        for dtype in (np.float64, np.longdouble):
            v = _real_level(x[todo], self.bounds[todo], self.levels, dtype)
            q = np.clip(np.rint(v), 0, self.levels)  # clip: float edge effects at ±B only, x is in range
            levels[todo] = q.astype(np.uint64)
            todo = todo[np.abs(np.abs(v - q) - 0.5) <= 2 * float(np.finfo(dtype).eps) * self.levels]
        # x = 0 is the common case here (a tensor a round did not touch): its real level is N/2 for
        # every bound, a half-integer since N is odd, so it always reaches this tier; decide it once.
        zero = x[todo] == 0.0
        levels[todo[zero]] = _exact_level(0.0, 1.0, self.levels)
        for i in todo[~zero].tolist():
            levels[i] = _exact_level(float(x[i]), float(self.bounds[i]), self.levels)
        return levels

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """(L,) uint64 sum of ``count`` encodings mod 2^64 → (L,) float64 sum of the values."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.max_count:
            raise ValueError(
                f"count must be in [1, {self.max_count}] for {self.bits}-bit levels in a 64-bit ring "
                f"(a larger sum would wrap), got {count!r}"
            )
        if not isinstance(total, np.ndarray) or total.dtype != np.uint64 or total.shape != self.bounds.shape:
            raise ValueError(f"total must be a {self.bounds.shape} uint64 array")
        ld = np.longdouble
        bounds = self.bounds.astype(ld)
        exact = total.astype(ld) * (2 * bounds / ld(self.levels)) - ld(count) * bounds  # (L,) extended precision
        decoded: np.ndarray = exact.astype(np.float64)
        return decoded

    def max_error(self, count: int) -> np.ndarray:
        """(L,) bound on |decode_sum(Σ encode(x_u), count) - Σ x_u| per element.

        count · B_i / (2^bits - 1): half a level per addend (exact rounding), plus the float64
        rounding of the decoded value, ≤ count · B_i · (eps64 + 8 eps_longdouble) (≈ 2^-52 relative:
        1/16 of the first term at 48 bits).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        bound: np.ndarray = count * self.bounds / self.levels + count * self.bounds * (_EPS_64 + 8 * _EPS_LD)
        return bound


def _real_level(x: np.ndarray, bounds: np.ndarray, levels: int, dtype: type[np.floating]) -> np.ndarray:
    """(x + B) · N / (2B) evaluated in ``dtype``: the level as a real number, in [0, N] up to rounding."""
    b = bounds.astype(dtype)
    v: np.ndarray = (x.astype(dtype) + b) * dtype(levels) / (2 * b)
    return v


def _exact_level(x: float, bound: float, levels: int) -> int:
    """round((x + B) · N / (2B)) in exact rational arithmetic, ties to even (as ``np.rint``)."""
    return round((Fraction(x) + Fraction(bound)) * levels / (2 * Fraction(bound)))
