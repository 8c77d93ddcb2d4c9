"""``node.toml``: a hospital node's settings, parsed once and checked before anything starts.

Example (every key is explained in ``deploy/node.example.toml``)::

    [node]
    site-id = "site-0"
    superlink = "fl.consortium.example:443"   # host:port hospitals dial (outbound only)
    data-dir = "/data/dicom"                   # the DICOM export, read-only
    state-dir = "/var/lib/medsynth-node"       # ledger, audit log, cache, salt
    epsilon-budget = 10.0                      # this hospital's own budget; no run can raise it
    delta = 1e-5                               # this hospital's δ; a run asking for another is refused
    accountant = "prv"
    max-epsilon-per-run = 10.0                 # the most ε one run may add (default: the budget)
    max-noise-multiplier = 10.0                # a training round needing a larger σ is refused
    runtime-port = 9094                        # the SuperNode's Runtime API on loopback, free at start
    [consortium]
    min-participants = 3                       # never below 3
    min-neighbours = 0                         # 0 (default): only the complete secure-aggregation graph
    [consortium.members]                       # pinned after checking fingerprints out of band
    site-0 = "<sha256 from `medsynth certs fingerprint`>"
    site-1 = "…"
    [tls]
    ca-certificate = "/etc/medsynth/ca.pem"
    [keys]
    auth-private-key = "/etc/medsynth/site-0.auth.key"
    signing-key-path = "/etc/medsynth/site-0.secagg.key"
    roster-path = "/etc/medsynth/roster.json"
    [apps]
    allowed-fab-sha256 = ["<sha256 from `medsynth server fab-hash`>"]

There is no ``insecure`` setting: a medsynth node connects only over TLS. The app allow-list
fails closed: an empty ``allowed-fab-sha256`` is refused unless the file also says, in words,
``any-app-may-run = true`` (then the node runs whatever code the server sends, and warns).

One vocabulary from this file to the code: a file setting is ``*-path`` here and in the node
config and ``*_path`` in code, a folder ``*-dir`` / ``*_dir``. A key this file does not know is
refused (an old name says its new one), so a misspelt ``state-dir`` cannot start an empty ledger.
Paths are resolved as they are loaded (absolute, without ``..``), and printed that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.certs import CertificateError, check_private_mode
from common.config import (
    DENOISE_CHOICES,
    MIN_PARTICIPANTS,
    NODE_DEFAULTS,
    RENAMED_NODE_KEYS,
    ConfigError,
    app_defaults,
    format_members,
    parse_class_names,
    parse_members,
    read_toml,
    site_paths,
)
from common.secagg import MIN_DEGREE, MembershipMismatch
from common.secagg.identity import Roster, SiteIdentity, fingerprint

NodeConfigValue = bool | int | float | str

NODE_TOML_KEYS: dict[str, frozenset[str]] = {
    # table → the settings it may hold
    "node": frozenset({"site-id", "superlink", "data-dir", "state-dir", "epsilon-budget", "delta", "accountant",
                       "allow-plain-aggregation", "max-epsilon-per-run", "max-noise-multiplier", "runtime-port"}),
    "tls": frozenset({"ca-certificate"}),
    "keys": frozenset({"auth-private-key", "signing-key-path", "roster-path"}),
    "consortium": frozenset({"min-participants", "min-neighbours", "members"}),
    "prepare": frozenset({"image-size", "class-names", "denoise"}),
    "apps": frozenset({"allowed-fab-sha256", "any-app-may-run"}),
}


def _check_known_keys(doc: Mapping[str, Any]) -> None:
    """Refuse a table or key ``node.toml`` does not define; an old key name says its new one."""
    for table, body in doc.items():
        if table not in NODE_TOML_KEYS or not isinstance(body, Mapping):
            raise ConfigError(f"[{table}] is not a node.toml table; known: {', '.join(sorted(NODE_TOML_KEYS))}")
        for key in body:
            if key in RENAMED_NODE_KEYS:
                raise ConfigError(f"[{table}] {key} is now {RENAMED_NODE_KEYS[key]} (one name from node.toml to "
                                  "the code); rename it")
            if key not in NODE_TOML_KEYS[table]:
                known = ", ".join(sorted(NODE_TOML_KEYS[table]))
                raise ConfigError(f"[{table}] {key} is not a setting; known: {known}")


#: ``[node] runtime-port``: where the SuperNode's Runtime API listens (loopback) for its own ClientApps.
DEFAULT_RUNTIME_PORT = 9094


def _resolve(value: Any, base: Path, what: str) -> Path:
    """``value`` as an absolute path without ``..`` (relative to ``base``), as it is printed and used."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} is required (a path)")
    return (base / Path(value).expanduser()).resolve()


def _positive(node: Mapping[str, Any], key: str, default: float, meaning: str) -> float:
    """A ``[node]`` number > 0 (``inf`` allowed: no cap), ``default`` when absent."""
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"[node] {key} = {value!r}: a number > 0, {meaning}")
    return float(value)


def _port(node: Mapping[str, Any]) -> int:
    port = node.get("runtime-port", DEFAULT_RUNTIME_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"[node] runtime-port = {port!r}: an integer in 1..65535 (a free port on this machine's "
                          "loopback, where the SuperNode serves its own ClientApps)")
    return port


def _denoise(prepare: Mapping[str, Any]) -> str:
    """``[prepare] denoise``: prepare's optional step (``common.denoise``), default none."""
    value = prepare.get("denoise", NODE_DEFAULTS["denoise"])
    if value not in DENOISE_CHOICES:
        raise ConfigError(f"[prepare] denoise = {value!r}: one of {', '.join(DENOISE_CHOICES)}")
    return str(value)


def _image_size(prepare: Mapping[str, Any]) -> int:
    """``[prepare] image-size``: the side of the cached images, by default the app's ``model.image-size``."""
    size = prepare["image-size"] if "image-size" in prepare else app_defaults()["model.image-size"]
    if isinstance(size, bool) or size not in (32, 64):
        raise ConfigError(f"[prepare] image-size = {size!r}: 32 or 64 (the run's model.image-size)")
    return int(size)


def _flag(node: Mapping[str, Any], key: str) -> bool:
    value = node.get(key, NODE_DEFAULTS[key])
    if not isinstance(value, bool):
        raise ConfigError(f"[node] {key} = {value!r}: expected true or false")
    return value


@dataclass(frozen=True)
class NodeDeployConfig:
    """Validated ``node.toml``; relative paths are relative to the file's folder."""

    site_id: str
    superlink: str  # host:port
    data_dir: Path
    state_dir: Path
    epsilon_budget: float
    ca_certificate: Path
    auth_private_key: Path
    signing_key_path: Path
    roster_path: Path
    allowed_fabs: tuple[str, ...]
    class_names: str
    members: tuple[tuple[str, str], ...]  # pinned (site id, signing-key fingerprint)
    delta: float
    accountant: str
    min_participants: int
    image_size: int  # [prepare] image-size, default the app's model.image-size
    allow_plain_aggregation: bool
    any_app_may_run: bool  # [apps] any-app-may-run: the hospital's explicit consent to no allow-list
    max_epsilon_per_run: float  # [node] max-epsilon-per-run: the most ε one run may add (default: the budget)
    max_noise_multiplier: float  # [node] max-noise-multiplier: a training σ above it is refused
    runtime_port: int  # [node] runtime-port: the SuperNode's Runtime API on 127.0.0.1
    denoise: str  # [prepare] denoise: prepare's optional step (common.denoise)
    min_neighbours: int = 0  # [consortium] min-neighbours: sparsest SecAgg+ graph accepted; 0: complete only

    @property
    def superlink_host(self) -> str:
        return self.superlink.rsplit(":", 1)[0].strip("[]")

    @property
    def superlink_port(self) -> int:
        return int(self.superlink.rsplit(":", 1)[1])

    @property
    def ledger_path(self) -> Path:
        return site_paths(self.state_dir).ledger_path

    @property
    def audit_path(self) -> Path:
        return site_paths(self.state_dir).audit_path

    @property
    def cache_dir(self) -> Path:
        return site_paths(self.state_dir).cache_dir

    @property
    def salt_path(self) -> Path:
        return site_paths(self.state_dir).salt_path

    def flower_node_config(self) -> dict[str, NodeConfigValue]:
        """What ``flower-supernode --node-config`` carries to every ClientApp (``SiteConfig``)."""
        return {
            "site-id": self.site_id,
            "data-dir": str(self.data_dir),
            "state-dir": str(self.state_dir),
            "cache-dir": str(self.cache_dir),
            "ledger-path": str(self.ledger_path),
            "audit-path": str(self.audit_path),
            "epsilon-budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "class-names": self.class_names,
            "denoise": self.denoise,
            "members": format_members(dict(self.members)),
            "min-participants": self.min_participants,
            "min-neighbours": self.min_neighbours,
            "signing-key-path": str(self.signing_key_path),
            "roster-path": str(self.roster_path),
            "allow-plain-aggregation": self.allow_plain_aggregation,
            "max-epsilon-per-run": self.max_epsilon_per_run,
            "max-noise-multiplier": self.max_noise_multiplier,
        }

    @staticmethod
    def load(path: Path) -> NodeDeployConfig:
        """Parse ``path`` and run every check of :meth:`check`; raises ``ConfigError`` naming the key."""
        doc = read_toml(path)
        base = path.parent.resolve()
        node: Mapping[str, Any] = doc.get("node", {})
        tls: Mapping[str, Any] = doc.get("tls", {})
        keys: Mapping[str, Any] = doc.get("keys", {})
        if "insecure" in node or "insecure" in tls:
            raise ConfigError("`insecure` is not a node.toml setting: medsynth nodes connect only over TLS")
        _check_known_keys(doc)
        budget = node.get("epsilon-budget")
        if (not isinstance(budget, int | float) or isinstance(budget, bool)
                or not (math.isfinite(budget) and budget > 0)):
            raise ConfigError(f"[node] epsilon-budget = {budget!r}: required, a finite number > 0 (this hospital's ε)")
        superlink = node.get("superlink")
        if not isinstance(superlink, str) or ":" not in superlink or not superlink.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"[node] superlink = {superlink!r}: expected host:port of the consortium server")
        apps: Mapping[str, Any] = doc.get("apps", {})
        fabs = apps.get("allowed-fab-sha256", [])
        if not isinstance(fabs, list) or not all(isinstance(h, str) and len(h) == 64 for h in fabs):
            raise ConfigError("[apps] allowed-fab-sha256 must be a list of 64-hex-digit SHA-256 strings")
        any_app = apps.get("any-app-may-run", False)
        if not isinstance(any_app, bool):
            raise ConfigError(f"[apps] any-app-may-run = {any_app!r}: expected true or false")
        prepare: Mapping[str, Any] = doc.get("prepare", {})
        consortium: Mapping[str, Any] = doc.get("consortium", {})
        members = consortium.get("members", {})
        if not isinstance(members, dict) or not members or not all(isinstance(v, str) for v in members.values()):
            raise ConfigError(
                "[consortium.members] is required: every member's site id = the SHA-256 fingerprint of its "
                "signing key (`medsynth certs fingerprint`), checked with each hospital out of band; this "
                "hospital is mixed only with the members it pinned"
            )
        delta = node.get("delta", NODE_DEFAULTS["delta"])
        accountant = node.get("accountant", NODE_DEFAULTS["accountant"])
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise ConfigError(f"[node] delta = {delta!r}: a number in (0, 1), this hospital's δ (e.g. 1e-5)")
        if accountant not in ("prv", "rdp"):
            raise ConfigError(f"[node] accountant = {accountant!r}: 'prv' or 'rdp'")
        min_participants = consortium.get("min-participants", NODE_DEFAULTS["min-participants"])
        if isinstance(min_participants, bool) or not isinstance(min_participants, int) \
                or min_participants < MIN_PARTICIPANTS:
            raise ConfigError(f"[consortium] min-participants = {min_participants!r}: an integer >= "
                              f"{MIN_PARTICIPANTS} (a sum over two hospitals reveals each to the other)")
        min_neighbours = consortium.get("min-neighbours", NODE_DEFAULTS["min-neighbours"])
        if isinstance(min_neighbours, bool) or not isinstance(min_neighbours, int) \
                or not (min_neighbours == 0 or min_neighbours >= MIN_DEGREE):
            raise ConfigError(f"[consortium] min-neighbours = {min_neighbours!r}: 0 (the default: only the complete "
                              f"secure-aggregation graph, every hospital masks with every other) or an integer >= "
                              f"{MIN_DEGREE}, the fewest neighbours this hospital accepts on a sparse SecAgg+ graph "
                              "(docs/privacy.md says what a sparse graph does not protect against)")
        class_names = prepare.get("class-names", "")
        if not isinstance(class_names, str) or not class_names.strip():
            raise ConfigError("[prepare] class-names is required: this hospital's label sub-folders in class "
                              "order, e.g. \"normal,lesion\"; a run with other classes is refused")
        cfg = NodeDeployConfig(
            site_id=str(node.get("site-id", "")),
            superlink=superlink,
            data_dir=_resolve(node.get("data-dir"), base, "[node] data-dir"),
            state_dir=_resolve(node.get("state-dir", "medsynth-node-state"), base, "[node] state-dir"),
            epsilon_budget=float(budget),
            ca_certificate=_resolve(tls.get("ca-certificate"), base, "[tls] ca-certificate"),
            auth_private_key=_resolve(keys.get("auth-private-key"), base, "[keys] auth-private-key"),
            signing_key_path=_resolve(keys.get("signing-key-path"), base, "[keys] signing-key-path"),
            roster_path=_resolve(keys.get("roster-path"), base, "[keys] roster-path"),
            allowed_fabs=tuple(h.lower() for h in fabs),
            image_size=_image_size(prepare),
            class_names=",".join(parse_class_names(class_names)),
            members=parse_members(format_members(members)),
            delta=float(delta),
            accountant=str(accountant),
            min_participants=min_participants,
            min_neighbours=min_neighbours,
            allow_plain_aggregation=_flag(node, "allow-plain-aggregation"),
            any_app_may_run=any_app,
            max_epsilon_per_run=_positive(node, "max-epsilon-per-run", float(budget),
                                          "the most ε one run may add to this hospital's ledger"),
            max_noise_multiplier=_positive(node, "max-noise-multiplier", float(NODE_DEFAULTS["max-noise-multiplier"]),
                                           "the largest σ this hospital trains at"),
            runtime_port=_port(node),
            denoise=_denoise(prepare),
        )
        cfg.check_apps()
        cfg.check()
        return cfg

    def check_apps(self) -> None:
        """The app allow-list fails closed: an empty list needs ``any-app-may-run = true`` in words.

        The server's app bundle is code executed at the hospital, next to its patients' images;
        without a list, any bundle the server sends runs. A list together with the opt-in is
        contradictory, so it is refused rather than guessed.
        """
        if not self.allowed_fabs and not self.any_app_may_run:
            raise ConfigError(
                "[apps] allowed-fab-sha256 is empty: this node would run any app the server sends. List "
                "the SHA-256 of the app your hospital agreed to run (the operator publishes it: "
                "`medsynth server fab-hash`), or, to run any app, say so with [apps] any-app-may-run = true"
            )
        if self.allowed_fabs and self.any_app_may_run:
            raise ConfigError(
                "[apps] any-app-may-run = true contradicts the non-empty allowed-fab-sha256 list: keep the "
                "list (only those apps run) and remove any-app-may-run, or empty the list to run any app"
            )

    def check(self) -> None:
        """Site id, data folder, CA certificate, both private keys (and 0600), roster entry."""
        if not self.site_id:
            raise ConfigError("[node] site-id is required (the name the roster and the server use)")
        if not self.data_dir.is_dir():
            raise ConfigError(f"[node] data-dir = {self.data_dir}: no such folder")
        try:
            x509.load_pem_x509_certificate(self.ca_certificate.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[tls] ca-certificate = {self.ca_certificate}: not a readable PEM certificate "
                              f"({exc})") from exc
        try:
            for key_path in (self.auth_private_key, self.signing_key_path):
                check_private_mode(key_path)
        except CertificateError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            auth = serialization.load_ssh_private_key(self.auth_private_key.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[keys] auth-private-key = {self.auth_private_key}: not an OpenSSH private key "
                              f"({exc}); make it with `medsynth certs node`") from exc
        if not isinstance(auth, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"[keys] auth-private-key = {self.auth_private_key}: Flower needs an EC key")
        try:
            identity = SiteIdentity.load(self.signing_key_path, self.site_id)
            roster = Roster.load(self.roster_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"secure-aggregation key or roster unreadable: {exc}") from exc
        if roster.keys.get(self.site_id) != identity.public_key():
            raise ConfigError(
                f"[keys] roster-path = {self.roster_path} has no entry for {self.site_id!r} matching this hospital's "
                f"signing key; ask the operator for the roster built from your {self.site_id}.secagg.json"
            )
        if dict(self.members).get(self.site_id) != fingerprint(identity.public_key()):
            raise ConfigError(
                f"[consortium.members] {self.site_id} must pin this hospital's own signing key "
                f"(fingerprint {fingerprint(identity.public_key())})"
            )
        try:
            roster.check_pinned(dict(self.members))
        except MembershipMismatch as exc:
            raise ConfigError(f"[keys] roster-path = {self.roster_path}: {exc}") from exc
