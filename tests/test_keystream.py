"""The kept zero input gives the same keystream as a fresh zero buffer, whatever the order of draws."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

import common.keystream as keystream
from common.dp.noise import ChaCha20Gaussian
from common.keystream import keystream_words
from common.secagg.primitives import prg_words


def _chacha(key: bytes) -> CipherContext:
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()


def _fresh_zero_words(key: bytes, lengths: list[int]) -> list[np.ndarray]:
    """The draws as the code made them before: a fresh zero buffer for each."""
    stream = _chacha(key)
    return [np.frombuffer(stream.update(bytes(8 * n)), dtype="<u8") for n in lengths]


@pytest.mark.parametrize("lengths", [[3, 1000, 7, 100_000, 0, 5], [100_000, 3, 200_000, 1]])
def test_draws_equal_the_keystream_of_fresh_zero_buffers(lengths: list[int]) -> None:
    # prepare: one key, the same draws both ways (short after long reads a prefix of the kept buffer)
    key = bytes(range(32))
    stream = _chacha(key)
    # act
    drawn = [keystream_words(stream, n) for n in lengths]
    # assert
    for got, want in zip(drawn, _fresh_zero_words(key, lengths), strict=True):
        assert got.dtype == np.uint64 and np.array_equal(got, want)
    assert not any(keystream._zeros)  # the kept input is still all zeros


def test_a_draw_above_the_kept_size_gets_its_own_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a cap of 64 bytes (8 words), an empty kept buffer
    monkeypatch.setattr(keystream, "KEEP_BYTES", 64)
    monkeypatch.setattr(keystream, "_zeros", b"")
    key = bytes(32)
    # act
    words = prg_words(key, 100)
    # assert: the RFC stream, and nothing kept
    assert np.array_equal(words, _fresh_zero_words(key, [100])[0])
    assert int(words[0]) == 0x903DF1A0ADE0B876  # RFC 8439 §A.1 test vector 1, as tests/test_secagg_crypto.py
    assert keystream._zeros == b""


def test_the_dp_noise_reads_the_same_words_in_order() -> None:
    # prepare
    noise = ChaCha20Gaussian(bytes(range(32)))
    # act
    first, second = noise.words(5), noise.words(50_000)
    # assert
    assert [np.array_equal(a, b) for a, b in
            zip((first, second), _fresh_zero_words(bytes(range(32)), [5, 50_000]), strict=True)] == [True, True]
    assert noise.words_used == 50_005
