"""Long-lived identities and the roster: file formats and permissions."""

from __future__ import annotations

import json
import stat

import pytest

from common.secagg import KeyAdvert, KeySwapDetected, Roster, SecAggClient, Session, SiteIdentity
from common.secagg.identity import ed25519_valid


def test_identity_file_is_private_pkcs8_and_loads_back(tmp_path):
    # prepare
    identity = SiteIdentity.generate("hospital-a")
    path = tmp_path / "keys" / "hospital-a.pem"

    # act
    identity.save(path)
    loaded = SiteIdentity.load(path, "hospital-a")

    # assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert loaded.public_key() == identity.public_key()
    assert len(identity.public_key()) == 32


def test_roster_file_is_json_of_hex_keys(tmp_path):
    # prepare
    ids = [SiteIdentity.generate(s) for s in ("b-site", "a-site")]
    roster = Roster({i.site_id: i.public_key() for i in ids})

    # act
    roster.save(tmp_path / "roster.json")
    raw = json.loads((tmp_path / "roster.json").read_text())
    loaded = Roster.load(tmp_path / "roster.json")

    # assert
    assert raw == {i.site_id: i.public_key().hex() for i in ids}
    assert all(len(v) == 64 for v in raw.values())  # 32 bytes as hex
    assert loaded.keys == roster.keys


def test_roster_rejects_malformed_keys(tmp_path):
    with pytest.raises(ValueError, match="32 raw bytes"):
        Roster({"a": b"\x01" * 31})
    (tmp_path / "r.json").write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="JSON object"):
        Roster.load(tmp_path / "r.json")


def test_advert_signature_covers_every_field():
    # prepare
    identity = SiteIdentity.generate("a")
    roster = Roster({"a": identity.public_key()})
    _, advert = SecAggClient.start(identity, Session(1, 1))

    # act: change each signed field in turn
    variants = [
        KeyAdvert("a", 2, 1, advert.c_pk, advert.s_pk, advert.signature),
        KeyAdvert("a", 1, 2, advert.c_pk, advert.s_pk, advert.signature),
        KeyAdvert("a", 1, 1, advert.s_pk, advert.c_pk, advert.signature),
    ]

    # assert
    roster.verify("a", advert.signed_payload(), advert.signature)
    assert len(advert.to_bytes()) == len(advert.signed_payload()) + 4 + 64
    for forged in variants:
        with pytest.raises(KeySwapDetected, match="does not verify"):
            roster.verify("a", forged.signed_payload(), forged.signature)


def test_a_remembered_signature_check_answers_only_for_the_same_bytes():
    # prepare: one site's advert, checked once, so that its answer is remembered in this process
    identity, other = SiteIdentity.generate("a"), SiteIdentity.generate("b")
    roster = Roster({"a": identity.public_key(), "b": other.public_key()})
    _, advert = SecAggClient.start(identity, Session(7, 3))
    payload, signature = advert.signed_payload(), advert.signature
    roster.verify("a", payload, signature)
    hits = ed25519_valid.cache_info().hits

    # act / assert: the same check again is answered from memory (and still passes) ...
    roster.verify("a", bytes(payload), bytes(signature))
    assert roster.signature_valid("a", payload, signature)
    assert ed25519_valid.cache_info().hits == hits + 2
    # ... while a byte changed anywhere, or another site's key, is a new check that fails
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    for site, data, sig in [("a", payload, flipped), ("a", payload + b"\x00", signature), ("b", payload, signature)]:
        assert not roster.signature_valid(site, data, sig)
        with pytest.raises(KeySwapDetected, match="does not verify"):
            roster.verify(site, data, sig)
    assert ed25519_valid(identity.public_key(), payload, signature)
