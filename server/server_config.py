"""``server.toml``: the aggregation server's deployment settings, parsed once and validated.

Example (every key is explained in ``deploy/server.example.toml``)::

    [superlink]
    host = "127.0.0.1"          # where the SuperLink listens (default; the reverse proxy is in front)
    port = 9093
    state-dir = "/var/lib/medsynth-server"   # Flower home, SQLite state, results
    [tls]
    ca-certificate = "/etc/medsynth/ca.pem"
    certificate = "/etc/medsynth/server.pem"
    private-key = "/etc/medsynth/server.key"
    [hospitals]                 # site id → its SuperNode authentication public key
    site-0 = "/etc/medsynth/hospitals/site-0.auth.pub"
    [run]                       # overrides of [tool.flwr.app.config] (pyproject.toml)
    num-server-rounds = 10
    init-from = "public/round-0020.safetensors"   # optional: start from a public model

``[run] init-from`` names a checkpoint on this machine (relative to the file's folder) that G and
D start from instead of the seeded random initialisation; it is checked (content hash, the run's
model shapes) when the file is loaded, so a wrong one is refused before anything starts.

TLS and node authentication are not options: a deployed SuperLink always runs with both.
Without ``host`` the SuperLink listens on 127.0.0.1 only: its port also serves Flower's Control
API, which has no authentication, so reaching it from elsewhere (a proxy in another container, a
LAN) is a decision the operator writes down as ``host``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.certs import CertificateError, check_private_mode, check_tls_pair
from common.config import ConfigError, RunConfig, app_defaults, check_overrides, read_toml

RunValue = bool | int | float | str

__all__ = ["ServerDeployConfig", "app_defaults", "check_run_overrides"]


def check_run_overrides(overrides: Mapping[str, Any], app_dir: Path) -> dict[str, RunValue]:
    """``[run]`` overrides with known keys and their types (ints accepted for floats), validated by
    parsing them over the app's defaults (``[tool.flwr.app.config]`` in ``app_dir``)."""
    return check_overrides(overrides, app_dir, where="[run] ")


def _path(doc: Mapping[str, Any], table: str, key: str, base: Path) -> Path:
    value = doc.get(table, {}).get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"[{table}] {key} is required (a file path)")
    path = Path(value)
    return path if path.is_absolute() else (base / path)


def _resolve_init_from(overrides: dict[str, RunValue], base: Path) -> dict[str, RunValue]:
    """``init-from`` made absolute (relative to server.toml's folder): the ServerApp runs elsewhere."""
    value = overrides.get("init-from")
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return {**overrides, "init-from": str(base / value)}
    return overrides


@dataclass(frozen=True)
class ServerDeployConfig:
    """Validated ``server.toml``; relative paths are relative to the file's folder."""

    host: str
    port: int
    state_dir: Path
    ca_certificate: Path
    certificate: Path
    private_key: Path
    hospitals: dict[str, Path]  # site id → SuperNode auth public key (OpenSSH)
    run_overrides: dict[str, RunValue]
    app_dir: Path
    run_timeout_s: float = 48 * 3600.0

    @property
    def database(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def results_dir(self) -> Path:
        """``output-dir`` of the run: checkpoints, samples, server_state.json."""
        return self.state_dir / "results"

    @property
    def local_host(self) -> str:
        """How this machine reaches its own SuperLink (named in the server certificate)."""
        if self.host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return self.host

    @staticmethod
    def load(path: Path, app_dir: Path) -> ServerDeployConfig:
        """Parse and check ``path``: files exist, key matches certificate, 0600 key, known run keys."""
        doc = read_toml(path)
        base = path.parent.resolve()
        link = doc.get("superlink", {})
        host = str(link.get("host", "127.0.0.1"))  # loopback unless the operator says otherwise
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not host.replace("-", "").replace(".", "").isalnum():
                raise ConfigError(f"[superlink] host = {host!r} is neither an IP address nor a host name") from None
        port = link.get("port", 9093)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"[superlink] port = {port!r}: expected an integer in 1..65535")
        state = Path(str(link.get("state-dir", "medsynth-server")))
        hours = link.get("run-timeout-hours", 48)
        if not isinstance(hours, int | float) or hours <= 0:
            raise ConfigError(f"[superlink] run-timeout-hours = {hours!r}: expected a number > 0")
        cfg = ServerDeployConfig(
            host=host,
            port=port,
            state_dir=state if state.is_absolute() else base / state,
            ca_certificate=_path(doc, "tls", "ca-certificate", base),
            certificate=_path(doc, "tls", "certificate", base),
            private_key=_path(doc, "tls", "private-key", base),
            hospitals={str(site): _path(doc, "hospitals", str(site), base) for site in doc.get("hospitals", {})},
            run_overrides=_resolve_init_from(check_run_overrides(doc.get("run", {}), app_dir), base),
            app_dir=app_dir,
            run_timeout_s=float(hours) * 3600.0,
        )
        cfg.check_files()
        cfg.check_init_from()
        return cfg

    def run_config(self) -> RunConfig:
        """The run this server submits: the app's defaults with ``[run]`` over them."""
        return RunConfig.from_flower({**app_defaults(self.app_dir), **self.run_overrides})

    def check_init_from(self) -> None:
        """``[run] init-from``, when set, is a checkpoint that verifies and has the run's model shapes."""
        path = str(self.run_overrides.get("init-from", ""))
        if path:
            from common.checkpoint_model import load_initial_model  # torch: only when a server.toml asks

            load_initial_model(Path(path), self.run_config().model, what="[run] init-from =")

    def check_files(self) -> None:
        """Fail fast, naming the file, on anything the SuperLink would otherwise trip over later."""
        for what, p in (("[tls] ca-certificate", self.ca_certificate), ("[tls] certificate", self.certificate),
                        ("[tls] private-key", self.private_key)):
            if not p.is_file():
                raise ConfigError(f"{what} = {p}: no such file (make it with `medsynth certs`)")
        try:
            check_tls_pair(self.certificate, self.private_key)
            check_private_mode(self.private_key)
        except CertificateError as exc:
            raise ConfigError(str(exc)) from exc
        if not self.hospitals:
            raise ConfigError("[hospitals] is empty: list each hospital's site id = its .auth.pub file")
        for site, key in self.hospitals.items():
            if not key.is_file():
                raise ConfigError(f"[hospitals] {site} = {key}: no such file (the hospital's {site}.auth.pub)")
            if not key.read_text(encoding="utf-8", errors="replace").startswith("ecdsa-sha2-"):
                raise ConfigError(
                    f"[hospitals] {site} = {key}: not an OpenSSH EC public key (from `medsynth certs node`)"
                )
