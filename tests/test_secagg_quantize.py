"""Quantization into Z_{2^64}: exact rounding, bounded decode error, no silent clipping."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from common.secagg import Quantizer, ValueOutOfRange


def test_golden_levels_at_8_bits():
    # prepare: B = 1, N = 255 levels above 0: q = round((x + 1) · 127.5)
    q = Quantizer(np.ones(5), bits=8)

    # act
    levels = q.encode(np.array([-1.0, 0.0, 0.5, 1.0, -0.5]))

    # assert: 127.5 → 128 (half to even), 191.25 → 191, 63.75 → 64
    assert levels.dtype == np.uint64
    assert levels.tolist() == [0, 128, 191, 255, 64]
    assert q.max_count == (2**64 - 1) // 255


def test_48_bit_sum_is_exact_up_to_2_16_sites():
    q = Quantizer(np.ones(1))
    assert q.levels == 2**48 - 1
    assert q.max_count == 2**16
    with pytest.raises(ValueError, match=r"count must be in \[1, 65536\]"):
        q.decode_sum(np.zeros(1, dtype=np.uint64), 2**16 + 1)


def test_encoding_is_the_exactly_rounded_level():
    # prepare: random values with mixed bounds; values a hair from a half-level (where float64
    # rounding can go either way); the edges; and x = 0, an exact tie at (2^48 - 1)/2
    rng = np.random.default_rng(3)  # test data only
    n_levels = 2**48 - 1
    bounds = np.concatenate([rng.uniform(1e-3, 50.0, 3000), np.ones(1000)])
    x = rng.uniform(-1, 1, 4000) * bounds
    k = rng.integers(0, n_levels, 1000)
    x[3000:] = (2 * k + 1) / n_levels - 1  # levels k + 1/2 up to float64 representation
    x[:5] = [-bounds[0], bounds[1], 0.0, np.nextafter(bounds[3], 0), 0.0]
    bounds[4] = 1.0
    q = Quantizer(bounds)

    # act
    levels = q.encode(x)

    # assert: equal to round((x + B)·N/(2B)) in exact rational arithmetic, ties to even
    pairs = zip(x, bounds, strict=True)
    exact = [round((Fraction(xi) + Fraction(bi)) * n_levels / (2 * Fraction(bi))) for xi, bi in pairs]
    assert levels.tolist() == exact
    assert levels[0] == 0 and levels[1] == n_levels
    assert levels[4] == 2**47  # the tie 2^47 - 1/2 goes to the even neighbour


def test_decoded_sum_is_within_max_error_of_the_true_sum():
    # prepare: 5 sites, 300 elements, bounds spanning 6 orders of magnitude
    rng = np.random.default_rng(4)  # test data only
    bounds = 10.0 ** rng.uniform(-4, 2, 300)
    xs = [rng.uniform(-1, 1, 300) * bounds for _ in range(5)]
    q = Quantizer(bounds)

    # act: the sum of encodings, wrapping mod 2^64 as the protocol's sum does
    total = np.zeros(300, dtype=np.uint64)
    for x in xs:
        total += q.encode(x)
    decoded = q.decode_sum(total, 5)

    # assert, in exact arithmetic so float error in the reference cannot hide a violation
    err = [abs(Fraction(d) - sum(Fraction(x[i]) for x in xs)) for i, d in enumerate(decoded)]
    bound = q.max_error(5)
    assert all(e <= Fraction(b) for e, b in zip(err, bound, strict=True))
    assert max(float(e / Fraction(b)) for e, b in zip(err, bound, strict=True)) > 0.5  # and within 2x of tight
    assert bound[0] == pytest.approx(5 * bounds[0] / (2**48 - 1), rel=1e-3)


@pytest.mark.parametrize(
    ("bad", "match"),
    [(1.0000001, r"element 2 = 1\.0000001"), (float("nan"), "element 2 = nan"), (-float("inf"), "element 2 = -inf")],
)
def test_out_of_range_and_non_finite_raise_naming_the_first_offender(bad, match):
    # prepare
    q = Quantizer(np.ones(4))
    x = np.array([0.0, 1.0, bad, 2.0])

    # act / assert: index 3 is also out of range; the first one is named
    with pytest.raises(ValueOutOfRange, match=match):
        q.encode(x)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="bounds"):
        Quantizer(np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="bits"):
        Quantizer(np.ones(2), bits=64)
    with pytest.raises(ValueError, match="shape"):
        Quantizer(np.ones(2)).encode(np.zeros(3))
