"""Long-lived site identities (Ed25519), the roster of trusted keys, and signed key adverts.

Bonawitz et al. (CCS 2017, §6.2 "active adversary") sign each round-0 key advert with a
long-term key whose public half every site knows from a trusted setup (here: the roster file a
consortium distributes out of band). Without it an aggregating server could replace a site's
X25519 public keys with its own and read every share addressed to that site (key substitution).
A ``KeyAdvert`` is signed over the canonical encoding of all its other fields, so a signature
from one run, setup or site never validates for another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import fsync_dir, write_json_atomic
from common.secagg.encoding import Reader, Writer, check_site_id, check_u64
from common.secagg.errors import KeySwapDetected, MembershipMismatch
from common.secagg.primitives import hkdf32
from common.secagg.session import Session

ED25519_PK_BYTES = 32
ED25519_SIG_BYTES = 64
X25519_PK_BYTES = 32
ADVERT_TAG = b"medsynth-secagg key-advert v1"


def fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a raw Ed25519 public key: what hospitals read to each other out of band
    and pin in their own configuration."""
    return hashlib.sha256(public_key).hexdigest()


class SiteIdentity:
    """A site's long-lived Ed25519 signing key; ``site_id`` is how the roster names it."""

    def __init__(self, site_id: str, private_key: Ed25519PrivateKey) -> None:
        self.site_id = check_site_id(site_id)
        self._key = private_key

    @staticmethod
    def generate(site_id: str) -> SiteIdentity:
        return SiteIdentity(site_id, Ed25519PrivateKey.generate())

    def public_key(self) -> bytes:
        """Raw 32-byte Ed25519 public key (what the roster stores)."""
        return self._key.public_key().public_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def derive_key(self, purpose: bytes) -> bytes:
        """32-byte symmetric key for local use (e.g. sealing client state), bound to purpose and site:
        HKDF-SHA256(ed25519 private seed, info = str(purpose) str(site_id))."""
        return hkdf32(self._key.private_bytes_raw(), Writer(purpose).put_str(self.site_id).done())

    def save(self, path: Path) -> None:
        """Unencrypted PKCS8 PEM, mode 0600 from creation on (never briefly world-readable), atomically."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)  # O_EXCL below: a stale file could carry wider permissions
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def load(path: Path, site_id: str) -> SiteIdentity:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: expected an Ed25519 private key (PKCS8 PEM), got {type(key).__name__}")
        return SiteIdentity(site_id, key)


#: Distinct (key, data, signature) checks remembered per process: one stage at 500 hospitals
#: checks about 1,000 (the next session's adverts and the survivor set's signatures).
CHECKS_REMEMBERED = 4096


@functools.lru_cache(maxsize=CHECKS_REMEMBERED)
def ed25519_valid(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature (RFC 8032) of ``data``.

    Remembered per process, keyed by the exact bytes of all three: verification is a
    deterministic function of them, so a remembered answer is the one a fresh check would give,
    and a changed byte anywhere is a new check. What it saves: in the Simulation Engine one
    process plays many hospitals, and each of them checks the same signed messages (every
    advert of the next session, every signature on the survivor set), 82 µs a check. At 100
    hospitals each checks about 200 a round (16 ms), 20,000 checks of 200 distinct signatures.
    On the Deployment Engine a ClientApp process handles one message and checks each once.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


class Roster:
    """site_id → raw Ed25519 public key of every consortium member, distributed out of band."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self.keys: dict[str, bytes] = {}
        for site_id, pk in keys.items():
            check_site_id(site_id)
            if len(pk) != ED25519_PK_BYTES:
                raise ValueError(f"roster key of {site_id!r} must be {ED25519_PK_BYTES} raw bytes, got {len(pk)}")
            Ed25519PublicKey.from_public_bytes(pk)  # rejects malformed points now, not mid-protocol
            self.keys[site_id] = bytes(pk)

    def save(self, path: Path) -> None:
        """JSON {site_id: hex public key}, sorted keys."""
        write_json_atomic(path, {site: pk.hex() for site, pk in self.keys.items()})

    @staticmethod
    def load(path: Path) -> Roster:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError(f"{path}: a roster is a JSON object {{site_id: hex Ed25519 public key}}")
        return Roster({site: bytes.fromhex(pk) for site, pk in raw.items()})

    def fingerprints(self) -> dict[str, str]:
        """site_id → :func:`fingerprint` of its key."""
        return {site: fingerprint(pk) for site, pk in self.keys.items()}

    def check_pinned(self, members: Mapping[str, str]) -> None:
        """``MembershipMismatch`` unless the roster is exactly the pinned membership.

        The operator builds the roster, so it alone cannot tell a hospital whom it is mixed
        with: two entries whose keys the operator holds plus one real hospital would pass every
        protocol check, and the "sum" would be that hospital's update. Each hospital therefore
        pins every member's site id and key fingerprint itself (verified out of band), and any
        difference — an extra site, a missing one, another key — is refused before any key is
        advertised or share sent.
        """
        have, want = self.fingerprints(), dict(members)
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        rekeyed = sorted(s for s in set(have) & set(want) if have[s] != want[s])
        if extra or missing or rekeyed:
            parts = [f"{label} {sites}" for label, sites in
                     (("not pinned by this hospital:", extra), ("pinned but absent:", missing),
                      ("with another key than pinned:", rekeyed)) if sites]
            raise MembershipMismatch(
                "the roster differs from the consortium membership this hospital pinned (" + "; ".join(parts)
                + "); nothing was sent. Compare fingerprints with the other hospitals out of band before "
                "changing [consortium.members]"
            )

    def signature_valid(self, site_id: str, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``site_id``'s roster key's signature of ``data`` (False for a
        site not in the roster)."""
        pk = self.keys.get(site_id)
        return pk is not None and ed25519_valid(pk, bytes(data), bytes(signature))

    def verify(self, site_id: str, data: bytes, signature: bytes) -> None:
        """``KeySwapDetected`` unless ``signature`` is ``site_id``'s roster key's signature of ``data``."""
        pk = self.keys.get(site_id)
        if pk is None:
            raise KeySwapDetected(f"site {site_id!r} is not in the roster; add its public key out of band first")
        if not ed25519_valid(pk, bytes(data), bytes(signature)):
            raise KeySwapDetected(
                f"key advert of site {site_id!r} does not verify against its roster key: keys were replaced "
                "in transit or signed by another site; aborting setup"
            )


@dataclass(frozen=True)
class KeyAdvert:
    """Round 0 of Bonawitz et al.: a site's two X25519 public keys, signed with its roster key."""

    site_id: str
    run_id: int
    setup_id: int
    c_pk: bytes  # X25519, share encryption
    s_pk: bytes  # X25519, pairwise masks
    signature: bytes  # Ed25519 over signed_payload()

    def __post_init__(self) -> None:
        check_site_id(self.site_id)
        check_u64("run_id", self.run_id)
        check_u64("setup_id", self.setup_id)
        for name, value, size in (
            ("c_pk", self.c_pk, X25519_PK_BYTES),
            ("s_pk", self.s_pk, X25519_PK_BYTES),
            ("signature", self.signature, ED25519_SIG_BYTES),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"advert of {self.site_id!r}: {name} must be {size} bytes")

    @property
    def session(self) -> Session:
        return Session(self.run_id, self.setup_id)

    @staticmethod
    def signed(identity: SiteIdentity, session: Session, c_pk: bytes, s_pk: bytes) -> KeyAdvert:
        payload = _payload(identity.site_id, session.run_id, session.setup_id, c_pk, s_pk)
        return KeyAdvert(identity.site_id, session.run_id, session.setup_id, c_pk, s_pk, identity.sign(payload))

    def signed_payload(self) -> bytes:
        """str(tag) str(site_id) u64(run) u64(setup) bytes(c_pk) bytes(s_pk)."""
        return _payload(self.site_id, self.run_id, self.setup_id, self.c_pk, self.s_pk)

    def to_bytes(self) -> bytes:
        """signed_payload() || bytes(signature)."""
        return self.signed_payload() + Writer().put_bytes(self.signature).done()

    @staticmethod
    def from_bytes(b: bytes) -> KeyAdvert:
        r = Reader(b, ADVERT_TAG)
        advert = KeyAdvert(r.get_str(), r.get_u64(), r.get_u64(), r.get_bytes(), r.get_bytes(), r.get_bytes())
        r.done()
        return advert


def _payload(site_id: str, run_id: int, setup_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return Writer(ADVERT_TAG).put_str(site_id).put_u64(run_id).put_u64(setup_id).put_bytes(c_pk).put_bytes(s_pk).done()
