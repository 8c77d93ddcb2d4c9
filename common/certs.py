"""Keys and certificates of a medsynth consortium, made where they are used.

Who makes what (private keys never leave the machine they were made on):

* the **server operator**: the consortium CA (``ca.pem``/``ca.key``) and the SuperLink's TLS
  certificate for the host names hospitals dial (``server.pem``/``server.key``, SAN = those
  names). Flower 1.41 uses TLS server-side only: hospitals verify the SuperLink against
  ``ca.pem``; the SuperLink authenticates hospitals by their node keys instead (no mTLS).
* each **hospital**: its SuperNode authentication key pair (EC P-384 in OpenSSH format, the
  format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read) and its secure-aggregation Ed25519 signing key. It sends only the two public halves
  (``<site>.auth.pub``, ``<site>.secagg.json``) to the operator.
* the **operator** collects every ``<site>.secagg.json`` into ``roster.json`` and gives it to
  every hospital (each checks its own entry; see ``deploy/README.md``).

Every private key is written with mode 0600 from creation on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import write_bytes_atomic, write_json_atomic
from common.errors import UserError
from common.secagg.identity import Roster, SiteIdentity, fingerprint

PRIVATE_MODE = 0o600
_CURVE = ec.SECP384R1()  # a NIST curve, as `flwr supernode register` requires


class CertificateError(UserError):
    """A key or certificate file is missing, malformed, or does not match; the message says which."""


@dataclass(frozen=True)
class KeyPairFiles:
    """A certificate (or public key) and its private key on disk."""

    public: Path
    private: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=PRIVATE_MODE)


def _refuse_overwrite(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise CertificateError(f"{path} already exists; move it away first (medsynth never overwrites a key)")


def create_ca(out_dir: Path, *, name: str = "medsynth consortium CA", days: int = 3650) -> KeyPairFiles:
    """Self-signed CA (BasicConstraints CA=true, pathlen 0; KeyUsage keyCertSign, cRLSign)."""
    files = KeyPairFiles(out_dir / "ca.pem", out_dir / "ca.key")
    _refuse_overwrite(files.public, files.private)
    key = ec.generate_private_key(_CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private_pem(files.private, key)
    write_bytes_atomic(files.public, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def load_ca(ca: KeyPairFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key; raises ``CertificateError`` when either is unusable."""
    try:
        cert = x509.load_pem_x509_certificate(ca.public.read_bytes())
        key = serialization.load_pem_private_key(ca.private.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read the CA ({ca.public}, {ca.private}): {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"{ca.private} is not the private key of {ca.public}")
    return cert, key


def issue_server_certificate(ca: KeyPairFiles, hosts: list[str], out_dir: Path, *, days: int = 825) -> KeyPairFiles:
    """The SuperLink's TLS certificate for ``hosts`` (DNS names or IP addresses), signed by the CA.

    Hospitals dial one of these names; TLS hostname verification fails for any other.
    ``localhost`` and ``127.0.0.1`` are always added: ``medsynth server start`` reaches its own
    SuperLink there.
    """
    if not hosts:
        raise CertificateError("give at least one --host: the name or address hospitals use to reach the server")
    files = KeyPairFiles(out_dir / "server.pem", out_dir / "server.key")
    _refuse_overwrite(files.public, files.private)
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))  # the server daemon dials its own SuperLink
    ca_cert, ca_key = load_ca(ca)
    key = ec.generate_private_key(_CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private_pem(files.private, key)
    write_bytes_atomic(files.public, cert.public_bytes(serialization.Encoding.PEM))
    return files


def create_node_auth_keys(out_dir: Path, site_id: str) -> KeyPairFiles:
    """A hospital's SuperNode authentication key pair: OpenSSH EC P-384, private 0600.

    The public half (``<site>.auth.pub``) is registered at the SuperLink with
    ``flwr supernode register``; only registered nodes may pull work.
    """
    files = KeyPairFiles(out_dir / f"{site_id}.auth.pub", out_dir / f"{site_id}.auth.key")
    _refuse_overwrite(files.public, files.private)
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(files.private, private, mode=PRIVATE_MODE)
    write_bytes_atomic(files.public, public + f" medsynth-{site_id}\n".encode())
    return files


def create_secagg_identity(out_dir: Path, site_id: str) -> KeyPairFiles:
    """A hospital's secure-aggregation signing key (Ed25519 PKCS8, 0600) and its public entry.

    ``<site>.secagg.json`` = ``{"site": id, "public_key": hex}``: what goes into the roster.
    """
    files = KeyPairFiles(out_dir / f"{site_id}.secagg.json", out_dir / f"{site_id}.secagg.key")
    _refuse_overwrite(files.public, files.private)
    identity = SiteIdentity.generate(site_id)
    identity.save(files.private)
    write_json_atomic(files.public, {"site": site_id, "public_key": identity.public_key().hex()})
    return files


def read_public_keys(paths: list[Path]) -> dict[str, bytes]:
    """site → raw Ed25519 public key from ``<site>.secagg.json`` entries or ``roster.json`` files."""
    keys: dict[str, bytes] = {}
    for path in paths:
        try:
            doc = json.loads(path.read_text())
            if "site" in doc and "public_key" in doc:  # <site>.secagg.json
                found = {str(doc["site"]): bytes.fromhex(str(doc["public_key"]))}
            else:  # roster.json {site: hex}
                found = {str(site): bytes.fromhex(str(pk)) for site, pk in doc.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CertificateError(f"{path} is neither a <site>.secagg.json public entry nor a roster: {exc}") from exc
        for site, key in found.items():
            if site in keys:
                raise CertificateError(f"site {site!r} appears twice ({path}); each hospital has one key")
            keys[site] = key
    return keys


def member_lines(keys: dict[str, bytes]) -> str:
    """``site = "fingerprint"`` lines for node.toml ``[consortium.members]``, sorted by site."""
    return "\n".join(f'{site} = "{fingerprint(pk)}"' for site, pk in sorted(keys.items()))


def build_roster(public_entries: list[Path], out: Path) -> Roster:
    """Combine hospitals' ``<site>.secagg.json`` files into ``roster.json``; one entry per site."""
    keys = read_public_keys(public_entries)
    try:
        roster = Roster(keys)
    except ValueError as exc:
        raise CertificateError(str(exc)) from exc
    roster.save(out)
    return roster


def check_tls_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    """Certificate and key load and belong together; raises ``CertificateError`` saying which fails."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{cert_path}: not a readable PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path}: not a readable unencrypted PEM private key ({exc})") from exc
    if key.public_key() != cert.public_key():
        raise CertificateError(f"{key_path} is not the private key of {cert_path}")
    return cert


def check_private_mode(path: Path) -> None:
    """A private key readable by group or others is refused (it may already have leaked)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise CertificateError(f"{path} has permissions {mode:o}; private keys must be 0600 (chmod 600 {path})")
