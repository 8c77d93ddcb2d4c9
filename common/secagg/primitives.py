"""Key agreement, key derivation, the mask PRG and share encryption, all from ``cryptography``.

* X25519 (RFC 7748) for both key pairs of Bonawitz et al. (CCS 2017, §4): c (share encryption)
  and s (pairwise masks). The agreement is symmetric, X25519(a_sk, b_pk) = X25519(b_sk, a_pk),
  which is what lets the pairwise masks of u and v cancel and lets the server recompute a
  dropped site's masks once it reconstructs that site's s key.
* HKDF-SHA256 (RFC 5869), no salt, 32-byte output. ``info`` (canonical, see ``encoding``):
    share key:  str("medsynth-secagg share-key") u64(run) u64(setup) str(min(u,v)) str(max(u,v))
    mask seed:  str("medsynth-secagg mask")      u64(run) u64(setup) str(min(u,v)) str(max(u,v)) u64(round)
  so a key is bound to its purpose, session, unordered pair and (for masks) round.
* ChaCha20 keystream (RFC 8439) as the PRG: 8·L bytes read as little-endian uint64. The nonce
  (counter || nonce, 16 bytes) is all zero, which is safe because every PRG key is used for one
  stream only: mask seeds are per (pair, round) and self-mask seeds b_u are fresh per round.
* ChaCha20-Poly1305 for shares: ciphertext = nonce (12 random bytes) || AEAD(share, ad), where
    ad = str("medsynth-secagg share-ad v1") u64(run) u64(setup) u64(round) str(sender) str(receiver) str(kind)
  round = 0 and kind = "s" for setup shares of the mask key, round = r and kind = "b" for
  self-mask seeds. The share key is shared by both directions of a pair and by every round, so
  the nonce is random (collision probability ~ messages² / 2^97) rather than a counter.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.keystream import keystream_words
from common.secagg.encoding import Writer
from common.secagg.errors import KeySwapDetected, ReplayDetected
from common.secagg.session import Session
from common.secagg.shamir import Share

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_PRG_WORDS = 2**35  # 2^32 ChaCha20 blocks of 64 bytes, 8 bytes per word
KIND_S = "s"  # share of the mask key s_u (setup, round 0)
KIND_B = "b"  # share of the self-mask seed b_u (one per round)


def hkdf32(ikm: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(ikm, salt=None, info) → 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(ikm)


def x25519(sk: X25519PrivateKey, peer_pk: bytes, *, peer: str) -> bytes:
    """X25519 shared secret; a malformed or low-order advertised key is reported against ``peer``."""
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError as exc:
        raise KeySwapDetected(f"advertised X25519 key of site {peer!r} is invalid ({exc}); re-run setup") from exc


def _pair(u: str, v: str) -> tuple[str, str]:
    return (u, v) if u <= v else (v, u)


def share_key(c_sk: X25519PrivateKey, peer_c_pk: bytes, session: Session, me: str, peer: str) -> bytes:
    """Symmetric AEAD key of the pair (me, peer) for this session (same key computed on both ends)."""
    lo, hi = _pair(me, peer)
    info = Writer(b"medsynth-secagg share-key").put_u64(session.run_id).put_u64(session.setup_id)
    return hkdf32(x25519(c_sk, peer_c_pk, peer=peer), info.put_str(lo).put_str(hi).done())


def mask_seed(shared: bytes, session: Session, u: str, v: str, round: int) -> bytes:
    """s_uv for round r: HKDF of X25519(s_u, s_v) bound to session, unordered pair and round."""
    lo, hi = _pair(u, v)
    info = Writer(b"medsynth-secagg mask").put_u64(session.run_id).put_u64(session.setup_id)
    return hkdf32(shared, info.put_str(lo).put_str(hi).put_u64(round).done())


def prg_words(key: bytes, length: int) -> np.ndarray:
    """(length,) uint64: the ChaCha20 keystream of ``key`` (zero nonce) read as little-endian words.

    A read-only view of the keystream buffer on little-endian hosts (no copy of 8·L bytes); use it
    as an operand, copy it to modify it."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"PRG keys are {KEY_BYTES} bytes, got {len(key)}")
    if not 0 <= length <= MAX_PRG_WORDS:
        raise ValueError(f"PRG length must be in [0, 2**35] words, got {length}")
    return keystream_words(Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor(), length)


def share_ad(session: Session, round: int, sender: str, receiver: str, kind: str) -> bytes:
    """Associated data binding a share ciphertext to (run, setup, round, sender, receiver, kind)."""
    w = Writer(b"medsynth-secagg share-ad v1").put_u64(session.run_id).put_u64(session.setup_id).put_u64(round)
    return w.put_str(sender).put_str(receiver).put_str(kind).done()


def seal_share(key: bytes, ad: bytes, share: Share) -> bytes:
    """nonce (12) || ChaCha20-Poly1305(share.to_bytes(), ad): 12 + 70 + 16 = 98 bytes."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, share.to_bytes(), ad)


def open_share(key: bytes, ad: bytes, ciphertext: bytes, *, what: str) -> Share:
    """Inverse of ``seal_share``; a ciphertext made for another run/setup/round/pair/kind is a replay."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise ReplayDetected(f"{what}: ciphertext of {len(ciphertext)} bytes is too short to be a share")
    try:
        plain = ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise ReplayDetected(
            f"{what}: ciphertext does not authenticate for this run/setup/round/sender/receiver/kind "
            "(replayed from another round or session, or tampered); refusing to reveal anything"
        ) from exc
    return Share.from_bytes(plain)
