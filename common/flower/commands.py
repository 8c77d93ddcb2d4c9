"""The command lines of Flower's daemons, and the config strings they take.

These two builders are the only places that decide a daemon's flags; the deployment kit
(``deploy/``) documents the same flags and a test compares them.

* ``flower-superlink`` serves Fleet, Control and Runtime (ServerAppIo / SimulationIo) HTTP APIs
  on one ``--host``/``--port``; no other port is opened unless ``FLWR_INTERNAL_GRPC_*`` or
  ``--health-server-address`` are set. TLS is server-side only; node authentication needs TLS.
* ``flower-supernode`` dials the SuperLink and serves a Runtime API for its own ClientApps on
  ``--host``/``--port`` (loopback only, here).
* Run and node configs: values are bool/int/float/str; keys use ``.`` for nesting. flwr's inline
  parser splits on ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` and cannot take a string holding both quote
  kinds or a newline; it accepts the path of a ``.toml`` file instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.flower.env import executable

__all__ = [
    "NodeConfig",
    "RunConfigValue",
    "ServerTls",
    "format_run_config",
    "node_config_argument",
    "superlink_command",
    "supernode_command",
    "write_run_config_file",
]

RunConfigValue = bool | int | float | str

#: A SuperNode's ``--node-config`` as a flat mapping (keys may use ``.`` for nesting).
NodeConfig = Mapping[str, RunConfigValue]

_RUN_CONFIG_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files: the CA that signed its certificate, the certificate, its key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def superlink_command(*, host: str, port: int, simulation: bool = False, tls: ServerTls | None = None,
                      node_auth: bool = False, database: Path | None = None) -> list[str]:
    """``flower-superlink`` listening on ``host:port``.

    ``simulation`` selects the Simulation Engine (Ray; no SuperNodes connect). Without ``tls``
    it serves plain HTTP (``--insecure``: loopback tests only). ``node_auth`` admits only
    SuperNodes whose public key was registered (``flwr supernode register``); it needs TLS.
    ``database`` keeps nodes, runs and messages in SQLite (else in memory). Runtime dependency
    installation is always off: it runs ``uv sync``, which needs the network.
    """
    if node_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses it over plain HTTP).")
    cmd = [str(executable("flower-superlink"))]
    if simulation:
        cmd.append("--simulation")
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_certificate), "--ssl-certfile", str(tls.certificate),
                "--ssl-keyfile", str(tls.private_key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    cmd += ["--isolation", "subprocess", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    return cmd


def supernode_command(*, superlink: str, runtime_port: int, node_config: NodeConfig, node_config_file: Path,
                      root_certificates: Path | None = None, auth_private_key: Path | None = None) -> list[str]:
    """``flower-supernode`` dialing ``superlink`` (``host:port``).

    Its Runtime API, for its own ClientApps, listens on ``127.0.0.1:runtime_port``. Without
    ``root_certificates`` it talks plain HTTP (``--insecure``: loopback tests only).
    ``auth_private_key`` signs its requests (the SuperLink's node authentication). The node
    config goes inline, or through ``node_config_file`` (see :func:`node_config_argument`).
    """
    if auth_private_key is not None and root_certificates is None:
        raise ValueError("SuperNode authentication needs TLS: give root_certificates with auth_private_key.")
    cmd = [str(executable("flower-supernode")), "--superlink", superlink]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_private_key)]
    cmd += ["--isolation", "subprocess",
            "--host", "127.0.0.1",  # Runtime API for its own ClientApps: loopback only
            "--port", str(runtime_port)]
    argument = node_config_argument(node_config, node_config_file)
    if argument is not None:
        cmd += ["--node-config", argument]
    return cmd


def _toml_value(key: str, value: RunConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
    if isinstance(value, str):
        if '"' not in value and "\\" not in value and "\n" not in value:
            return f'"{value}"'
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        raise ValueError(
            f"Run-config value for {key!r} contains both quote kinds or a newline; flwr's "
            "inline `--run-config` parser cannot take it. Pass it via a TOML file "
            "(run_app does this automatically)."
        )
    raise TypeError(f"Run-config value for {key!r} must be bool, int, float or str.")


def _check_config(config: Mapping[str, Any]) -> None:
    for key, value in config.items():
        if not isinstance(key, str) or not _RUN_CONFIG_KEY_RE.match(key):
            raise ValueError(
                f"Run-config key {key!r} is invalid: use letters, digits, '-', '_' and "
                "'.' for nesting (e.g. 'dp.noise-multiplier')."
            )
        if not isinstance(value, bool | int | float | str):
            raise TypeError(
                f"Run-config value for {key!r} has type {type(value).__name__}; Flower "
                "run configs only take bool, int, float or str."
            )


def format_run_config(run_config: Mapping[str, RunConfigValue]) -> str:
    """Render a config as one inline ``k=v k2="str"`` string (``--run-config``/``--node-config``).

    Strings are TOML-quoted (``k="v w"``; literal ``'...'`` if the value contains ``"`` or a
    backslash). A string with both quote kinds or a newline raises ``ValueError``: pass such a
    config as a TOML file instead (:func:`write_run_config_file`).
    """
    _check_config(run_config)
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in run_config.items())


def write_run_config_file(path: Path, config: Mapping[str, RunConfigValue]) -> Path:
    """Write a config as TOML; flwr reads a single ``--run-config``/``--node-config`` ending in ``.toml``."""
    _check_config(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(config)), encoding="utf-8")
    return path


def node_config_argument(config: NodeConfig, toml_path: Path) -> str | None:
    """The value for ``flower-supernode --node-config``, or ``None`` for an empty config.

    Normally the inline form of :func:`format_run_config`, which shows up in ``ps``. A config
    holding a string with both quote kinds or a newline is written to ``toml_path`` instead,
    whose path flwr accepts in place of the inline form.
    """
    if not config:
        return None
    inline_ok = all(
        not isinstance(v, str) or ("\n" not in v and not ('"' in v and "'" in v)) for v in config.values()
    )
    if inline_ok:
        return format_run_config(config)  # also validates keys and value types
    return str(write_run_config_file(toml_path, config))
