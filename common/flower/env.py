"""Where Flower's executables are, and the environment that isolates the daemons we start.

Facts this relies on (flwr 1.41.0, Linux):

* Flower spawns its helpers by bare name (``flower-superexec``, ``flwr-serverapp``,
  ``flwr-clientapp``, ``flwr-simulation``), so this interpreter's ``bin`` must come first on
  ``PATH``.
* ``flwr run`` against the magic ``:local:`` connection starts a *shared*, detached SuperLink
  on fixed ports under ``~/.flwr``; a private ``FLWR_HOME`` with a named connection in its
  ``config.toml`` keeps every ``flwr`` call on the daemon we started.
* Every process we start carries a unique tag in its environment (:data:`TAG_ENV_VAR`), which
  all descendants inherit whatever session Flower puts them in; that is how
  :mod:`common.flower.processes` finds and stops exactly what we started.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from common.config import ConfigError
from common.flower.errors import SuperLinkError

__all__ = ["MAX_RAY_TMPDIR_LEN", "TAG_ENV_VAR", "FlowerEnv", "app_dir", "executable", "free_port", "venv_bin"]

#: Environment variable that marks every process started through this package.
TAG_ENV_VAR = "MEDSYNTH_SUPERLINK_TAG"

#: Ray puts AF_UNIX sockets at ``$RAY_TMPDIR/ray/session_<date>_<pid>/sockets/...``
#: (about 67 bytes) and the kernel limit is 107 bytes, so RAY_TMPDIR must be short.
MAX_RAY_TMPDIR_LEN = 36

#: Variables that would make our processes join or open shared resources.
_SCRUBBED_ENV_VARS = (
    "RAY_ADDRESS",  # ray.init() would connect to a foreign cluster
    "FLWR_INTERNAL_GRPC_CONTROL_API",  # opens an extra gRPC port (0.0.0.0:9093)
    "FLWR_INTERNAL_GRPC_FLEET_API",  # opens an extra gRPC port (0.0.0.0:9092)
    "FLWR_LOCAL_CONTROL_API_PORT",
)

_CONNECTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def venv_bin() -> Path:
    """Directory of the running interpreter's console scripts (not symlink-resolved)."""
    return Path(sys.executable).parent


def executable(name: str) -> Path:
    """Path of Flower's console script ``name`` in this interpreter's environment."""
    path = venv_bin() / name
    if not path.is_file():
        raise SuperLinkError(
            f"`{name}` not found at {path}. Install `flwr[simulation]==1.41.0` into the "
            f"environment of {sys.executable} (e.g. `pip install -e .` in the repo)."
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0).

    There is an unavoidable race until the daemon binds it; callers that pick a free port
    retry with a new one when the daemon's log says "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def app_dir() -> Path:
    """The medsynth Flower App folder (``pyproject.toml`` with ``[tool.flwr.app]``).

    Found from where this package is installed: the folder above ``common/``. The app runs
    from a checkout or an editable install (``make install``, the container images); a plain
    wheel install has no app folder to submit.
    """
    return check_app_folder(Path(__file__).resolve().parents[2])


def check_app_folder(root: Path) -> Path:
    """``root`` if it holds the medsynth project, else a ``ConfigError`` saying what to do.

    Its name does not matter: ``flwr run`` is given a copy staged under a name Flower accepts
    (:func:`common.flower.fab.stage_app`)."""
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"cannot find the medsynth project at {root}; install it with `make install`")
    return root


@dataclass(frozen=True)
class FlowerEnv:
    """Everything that isolates one Flower daemon (and its ``flwr`` calls) from the rest of the machine.

    Attributes
    ----------
    flwr_home : Path
        Private ``FLWR_HOME``: ``config.toml``, installed FABs (``apps/``), logs.
    port : int
        The SuperLink's HTTP port (Fleet, Control and Runtime APIs in flwr 1.41).
    ray_tmpdir : Path | None
        ``RAY_TMPDIR`` for the Ray cluster that ``flwr-simulation`` starts; only the Simulation
        Engine needs it (``None`` elsewhere). Must be short (:data:`MAX_RAY_TMPDIR_LEN`).
    host : str
        Address ``flwr`` and health checks use to reach the SuperLink.
    connection : str
        Name of the SuperLink connection written to ``config.toml``.
    tag : str
        Value of :data:`TAG_ENV_VAR` inherited by every process we start.
    root_certificates : Path | None
        CA certificate that signed the SuperLink's TLS certificate, or ``None`` for a
        plain-HTTP loopback SuperLink (simulation and the insecure test deployment).
    ray_address : str | None
        ``HOST:PORT`` of an existing Ray cluster's GCS for the Simulation Engine to join: set
        as ``RAY_ADDRESS``, which ``ray.init()`` in ``flwr-simulation`` reads (Flower's backend
        config has no address key). ``None``: ``RAY_ADDRESS`` is removed and ``flwr-simulation``
        starts its own private Ray.
    """

    flwr_home: Path
    port: int
    ray_tmpdir: Path | None = None
    host: str = "127.0.0.1"
    connection: str = "medsynth-local"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    root_certificates: Path | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        """Validate values that would otherwise fail deep inside flwr or Ray."""
        if not _CONNECTION_NAME_RE.match(self.connection):
            raise ValueError(f"Connection name {self.connection!r} must match [A-Za-z0-9_-]+.")
        if not 0 < self.port < 65536:
            raise ValueError(f"Port {self.port} is outside 1..65535.")
        if self.ray_tmpdir is not None and len(str(self.ray_tmpdir)) > MAX_RAY_TMPDIR_LEN:
            raise ValueError(
                f"ray_tmpdir {str(self.ray_tmpdir)!r} is longer than "
                f"{MAX_RAY_TMPDIR_LEN} characters; Ray's AF_UNIX socket paths would "
                "exceed 107 bytes. Use a short path (e.g. a symlink under /tmp)."
            )

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink, as ``flwr`` and SuperNodes expect it."""
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``https://host:port`` with TLS, else ``http://host:port``."""
        return f"{'https' if self.root_certificates else 'http'}://{self.address}"

    @property
    def config_path(self) -> Path:
        """``$FLWR_HOME/config.toml`` read by every ``flwr`` CLI command."""
        return self.flwr_home / "config.toml"

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the environment for Flower daemons and ``flwr`` CLI subprocesses.

        Starts from ``base`` (default: ``os.environ``), removes variables that would reach
        shared resources and sets: our ``FLWR_HOME``; telemetry, update check and runtime
        dependency installation (``uv sync``, fails offline) off; with a ``ray_tmpdir``, Ray's
        temp dir and usage stats; with a ``ray_address``, ``RAY_ADDRESS`` (the only way back in for
        the scrubbed variable); the venv ``bin`` first on ``PATH``; and the process tag.
        """
        env = dict(os.environ if base is None else base)
        for name in _SCRUBBED_ENV_VARS:
            env.pop(name, None)
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                # If anything still resolves the `:local:` connection, it finds ours
                # (healthy) instead of spawning the shared one on 39091.
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
                "PATH": os.pathsep.join([str(venv_bin()), env.get("PATH", "")]),
                "NO_COLOR": "1",
                "COLUMNS": "200",
                "PYTHONUNBUFFERED": "1",
                TAG_ENV_VAR: self.tag,
            }
        )
        if self.ray_tmpdir is not None:
            env.update(
                {
                    "RAY_TMPDIR": str(self.ray_tmpdir),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                }
            )
        if self.ray_address is not None:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def write_config(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with our connection as the default."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        link: dict[str, str | bool] = {"address": self.address}
        if self.root_certificates is not None:
            link["root-certificates"] = str(self.root_certificates)
        else:
            link["insecure"] = True
        doc = {"superlink": {"default": self.connection, self.connection: link}}
        self.config_path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return self.config_path
