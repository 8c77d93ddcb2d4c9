"""Sealing a site's protocol state so it can live between Flower messages.

A Flower ClientApp is re-instantiated per message, so ``SecAggClient`` state (its two X25519
private keys, the peers' public keys, the round counter and which shares it already released)
must be stored in between, typically in the node's context state, which may be persisted to
disk. The state is therefore sealed with ChaCha20-Poly1305 under a key derived from the site's
long-lived Ed25519 key (``SiteIdentity.derive_key``), so a copy of the blob alone reveals no
mask key and an edited blob (e.g. a reset ``b_revealed`` set) is rejected.

Blob layout: nonce (12 random bytes) || AEAD(JSON state, ad = str("medsynth-secagg client-state v1")
str(site_id)). Not protected: rolling back to an *older* authentic blob; keep the blob where
only the site's process writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from common.secagg.encoding import Writer
from common.secagg.errors import StateRejected
from common.secagg.identity import SiteIdentity

STATE_TAG = b"medsynth-secagg client-state v1"
STATE_VERSION = 3  # 2: adds the graph (degree, seed); 3: the survivor set agreed for the round
_NONCE = 12


def _ad(identity: SiteIdentity) -> bytes:
    return Writer(STATE_TAG).put_str(identity.site_id).done()


def seal_state(identity: SiteIdentity, state: dict[str, Any]) -> bytes:
    """nonce || AEAD(json(state)) under a key only ``identity`` can derive."""
    plain = json.dumps({"version": STATE_VERSION, **state}, sort_keys=True, separators=(",", ":")).encode()
    nonce = os.urandom(_NONCE)
    return nonce + ChaCha20Poly1305(identity.derive_key(STATE_TAG)).encrypt(nonce, plain, _ad(identity))


def open_state(identity: SiteIdentity, blob: bytes) -> dict[str, Any]:
    """Inverse of ``seal_state``; ``StateRejected`` for another site's, a tampered or a truncated blob."""
    try:
        plain = ChaCha20Poly1305(identity.derive_key(STATE_TAG)).decrypt(blob[:_NONCE], blob[_NONCE:], _ad(identity))
    except (InvalidTag, ValueError) as exc:
        raise StateRejected(
            f"secagg state does not authenticate for site {identity.site_id!r}: it belongs to another site or "
            "identity key, or was modified; start a new setup instead of reusing it"
        ) from exc
    state = json.loads(plain)
    version = state.get("version") if isinstance(state, dict) else None
    if version != STATE_VERSION:
        raise StateRejected(f"secagg state version {version!r} is not {STATE_VERSION}; start a new setup")
    return dict(state)
