"""Keys and certificates: who can verify what, file modes, and refusals."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.certs import (
    CertificateError,
    KeyPairFiles,
    build_roster,
    check_private_mode,
    check_tls_pair,
    create_ca,
    create_node_auth_keys,
    create_secagg_identity,
    issue_server_certificate,
)
from common.secagg.identity import SiteIdentity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_issued_by_the_ca_for_the_given_and_local_names(tmp_path: Path) -> None:
    # prepare
    ca = create_ca(tmp_path / "ca")
    # act
    server = issue_server_certificate(ca, ["fl.example.org", "10.0.0.7"], tmp_path / "tls")
    # assert
    ca_cert = x509.load_pem_x509_certificate(ca.public.read_bytes())
    cert = x509.load_pem_x509_certificate(server.public.read_bytes())
    cert.verify_directly_issued_by(ca_cert)  # raises if not signed by the CA
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.7", "127.0.0.1"}
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert _mode(ca.private) == 0o600 and _mode(server.private) == 0o600
    check_tls_pair(server.public, server.private)


def test_a_certificate_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    ca, other = create_ca(tmp_path / "ca"), create_ca(tmp_path / "other")
    server = issue_server_certificate(ca, ["fl.example.org"], tmp_path / "tls")
    cert = x509.load_pem_x509_certificate(server.public.read_bytes())
    with pytest.raises((ValueError, InvalidSignature)):
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(other.public.read_bytes()))


def test_node_keys_are_flower_loadable_and_private_halves_are_0600(tmp_path: Path) -> None:
    # act
    auth = create_node_auth_keys(tmp_path, "site-0")
    secagg = create_secagg_identity(tmp_path, "site-0")
    # assert
    key = serialization.load_ssh_private_key(auth.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(auth.public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp384r1" and key.public_key() == public
    identity = SiteIdentity.load(secagg.private, "site-0")
    assert json.loads(secagg.public.read_text()) == {"site": "site-0", "public_key": identity.public_key().hex()}
    assert _mode(auth.private) == 0o600 and _mode(secagg.private) == 0o600
    assert _mode(auth.public) & 0o044  # public halves are meant to be shared


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    create_ca(tmp_path)
    with pytest.raises(CertificateError, match="already exists"):
        create_ca(tmp_path)
    create_node_auth_keys(tmp_path, "site-0")
    with pytest.raises(CertificateError, match="already exists"):
        create_node_auth_keys(tmp_path, "site-0")


def test_roster_holds_each_hospitals_public_key_once(tmp_path: Path) -> None:
    entries = [create_secagg_identity(tmp_path / s, s).public for s in ("site-0", "site-1")]
    roster = build_roster(entries, tmp_path / "roster.json")
    for site in ("site-0", "site-1"):
        assert roster.keys[site] == SiteIdentity.load(tmp_path / site / f"{site}.secagg.key", site).public_key()
    with pytest.raises(CertificateError, match="twice"):
        build_roster([entries[0], entries[0]], tmp_path / "dup.json")


def test_mismatched_pair_and_loose_permissions_are_refused(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    a = issue_server_certificate(ca, ["a"], tmp_path / "a")
    b = issue_server_certificate(ca, ["b"], tmp_path / "b")
    with pytest.raises(CertificateError, match="is not the private key"):
        check_tls_pair(a.public, b.private)
    b.private.chmod(0o644)
    with pytest.raises(CertificateError, match="0600"):
        check_private_mode(b.private)
    with pytest.raises(CertificateError, match="cannot read the CA"):
        issue_server_certificate(KeyPairFiles(tmp_path / "none.pem", tmp_path / "none.key"), ["x"], tmp_path / "c")
