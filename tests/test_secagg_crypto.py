"""Building blocks: Shamir sharing, the ChaCha20 PRG, HKDF binding, share AEAD, canonical encodings."""

from __future__ import annotations

import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg import InconsistentShares, ReplayDetected, Session, Share
from common.secagg.encoding import Writer
from common.secagg.primitives import mask_seed, open_share, prg_words, seal_share, share_ad, share_key
from common.secagg.shamir import PRIME, interpolate, reconstruct_secret, split_secret

SESSION = Session(run_id=5, setup_id=9)


def test_prime_is_the_mersenne_521():
    assert PRIME == 2**521 - 1
    assert pow(3, PRIME - 1, PRIME) == 1  # Fermat witness; p is the known Mersenne prime M521


def test_lagrange_golden_polynomial():
    # prepare: f(x) = 42 + 7x + 3x² → f(1) = 52, f(2) = 68, f(3) = 90
    shares = [Share(1, 52), Share(2, 68), Share(3, 90)]

    # act / assert
    assert interpolate(shares, 0) == 42
    assert interpolate(shares, 4) == 42 + 28 + 48
    assert reconstruct_secret(shares, 3) == (42).to_bytes(32, "big")


def test_every_t_subset_reconstructs_and_t_minus_one_does_not():
    # prepare
    secret = bytes(range(32))
    shares = split_secret(secret, 5, 3)

    # act
    recovered = {reconstruct_secret(list(sub), 3) for sub in itertools.combinations(shares, 3)}

    # assert
    assert recovered == {secret}
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="need 3 shares, have 2"):
        reconstruct_secret(shares[:2], 3)


def test_two_shares_of_a_3_of_n_sharing_fit_every_secret():
    # prepare: perfect secrecy. For any candidate c, the parabola through (0, c), (1, y1), (2, y2)
    # has f(3) = c - 3·y1 + 3·y2 (Lagrange weights 1, -3, 3), a valid third share; so two shares
    # are equally consistent with every 32-byte secret
    s1, s2 = split_secret(b"\x01" * 32, 5, 3)[:2]
    candidates = [bytes(32), b"\xff" * 32, b"medsynth".ljust(32, b"\x00")]

    # act
    recovered = [
        reconstruct_secret([s1, s2, Share(3, (int.from_bytes(c, "big") - 3 * s1.y + 3 * s2.y) % PRIME)], 3)
        for c in candidates
    ]

    # assert
    assert recovered == candidates


def test_a_corrupted_extra_share_is_detected():
    # prepare
    shares = split_secret(b"\x07" * 32, 5, 3)
    bad = [*shares[:4], Share(5, (shares[4].y + 1) % PRIME)]

    # act / assert
    with pytest.raises(InconsistentShares, match="x=5"):
        reconstruct_secret(bad, 3)


def test_prg_is_the_rfc_chacha20_keystream():
    # RFC 7539 §A.1 test vector 1 (zero key, zero nonce): keystream begins 76 b8 e0 ad a0 f1 3d 90
    words = prg_words(bytes(32), 3)
    assert words.dtype.kind == "u" and words.dtype.itemsize == 8
    assert int(words[0]) == 0x903DF1A0ADE0B876  # little-endian read of the first 8 bytes
    assert int(words[1]) == 0x28BD8653E56A5D40
    assert prg_words(bytes(32), 1)[0] == words[0]  # a prefix of the same stream


def test_mask_seed_is_symmetric_and_bound_to_round_and_session():
    # prepare
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ab = a.exchange(b.public_key())
    ba = b.exchange(a.public_key())

    # act
    seeds = {
        "ab": mask_seed(ab, SESSION, "site-a", "site-b", 1),
        "ba": mask_seed(ba, SESSION, "site-b", "site-a", 1),
        "round2": mask_seed(ab, SESSION, "site-a", "site-b", 2),
        "setup10": mask_seed(ab, Session(5, 10), "site-a", "site-b", 1),
    }

    # assert
    assert seeds["ab"] == seeds["ba"]
    assert len({seeds["ab"], seeds["round2"], seeds["setup10"]}) == 3


def test_share_ciphertext_opens_only_with_its_exact_associated_data():
    # prepare
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    k_ab = share_key(a, b.public_key().public_bytes_raw(), SESSION, "site-a", "site-b")
    k_ba = share_key(b, a.public_key().public_bytes_raw(), SESSION, "site-b", "site-a")
    share = Share(2, 123456789)
    ct = seal_share(k_ab, share_ad(SESSION, 3, "site-a", "site-b", "b"), share)

    # act / assert
    assert k_ab == k_ba
    assert len(ct) == 12 + 70 + 16
    assert open_share(k_ba, share_ad(SESSION, 3, "site-a", "site-b", "b"), ct, what="t") == share
    for wrong in (
        share_ad(SESSION, 2, "site-a", "site-b", "b"),  # other round
        share_ad(Session(6, 9), 3, "site-a", "site-b", "b"),  # other run
        share_ad(SESSION, 3, "site-b", "site-a", "b"),  # direction swapped
        share_ad(SESSION, 3, "site-a", "site-b", "s"),  # other kind
    ):
        with pytest.raises(ReplayDetected):
            open_share(k_ba, wrong, ct, what="t")


def test_encoding_is_unambiguous():
    assert Writer().put_str("ab").put_str("c").done() != Writer().put_str("a").put_str("bc").done()
    assert Writer(b"t").put_u64(1).done() == b"\x00\x00\x00\x01t" + b"\x00" * 7 + b"\x01"
