"""Run a Flower App on a private, local SuperLink (Simulation Engine) via ``flwr run``.

Why this module exists
----------------------
``flwr run`` against the magic ``:local:`` connection starts a *shared*, detached
SuperLink on fixed ports (39091/39093) under ``~/.flwr`` that outlives the command.
Tests and the ``medsynth`` CLI must not use or leave anything machine-wide, so this
module starts its own ``flower-superlink --simulation`` with its own ``FLWR_HOME``,
its own free port and its own Ray temp dir, writes a named connection into
``$FLWR_HOME/config.toml``, submits runs with ``flwr run`` and stops exactly the
processes it started.

Facts this relies on (flwr 1.41.0, Linux):

* ``flower-superlink`` serves Fleet, Control and Runtime (ServerAppIo /
  SimulationIo) HTTP APIs on one ``--host``/``--port``; no other port is opened
  unless ``FLWR_INTERNAL_GRPC_*`` or ``--health-server-address`` are set.
* The SuperLink spawns ``flower-superexec`` with ``start_new_session=True``; the
  SuperExec spawns ``flwr-simulation``, which starts a whole Ray cluster (gcs_server,
  raylet, agents, workers).  These live in *another* session than the SuperLink, so
  killing the SuperLink's process group is not enough: after a SIGTERM mid-run the
  Simulation and Ray processes were left orphaned indefinitely.  Every process we
  start therefore carries a unique environment tag (``MEDSYNTH_SUPERLINK_TAG``),
  which all descendants inherit (verified for Ray workers), and shutdown scans
  ``/proc/*/environ`` for it.
* Executables are spawned by bare name (``flower-superexec``, ``flwr-simulation``),
  so the venv's ``bin`` must come first on ``PATH``.
* ``flwr run``/``flwr ls --format json`` exit with 0 even on failure; the JSON
  ``success`` field and the run status (``finished:completed|failed|stopped``) are
  the truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import tomli_w

from common.errors import UserError

__all__ = [
    "TAG_ENV_VAR",
    "FlowerConnection",
    "FlowerEnv",
    "LocalSuperLink",
    "RunConfigValue",
    "RunFailedError",
    "RunResult",
    "SuperLinkError",
    "find_tagged_pids",
    "format_run_config",
    "free_port",
    "run_app",
    "signal_tagged_until_gone",
]

#: Environment variable that marks every process started through this module.
TAG_ENV_VAR = "MEDSYNTH_SUPERLINK_TAG"

#: Ray puts AF_UNIX sockets at ``$RAY_TMPDIR/ray/session_<date>_<pid>/sockets/...``
#: (about 67 bytes) and the kernel limit is 107 bytes, so RAY_TMPDIR must be short.
_MAX_RAY_TMPDIR_LEN = 36

#: Variables that would make our processes join or open shared resources.
_SCRUBBED_ENV_VARS = (
    "RAY_ADDRESS",  # ray.init() would connect to a foreign cluster
    "FLWR_INTERNAL_GRPC_CONTROL_API",  # opens an extra gRPC port (0.0.0.0:9093)
    "FLWR_INTERNAL_GRPC_FLEET_API",  # opens an extra gRPC port (0.0.0.0:9092)
    "FLWR_LOCAL_CONTROL_API_PORT",
)

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONNECTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RUN_CONFIG_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

RunConfigValue = bool | int | float | str


class SuperLinkError(UserError, RuntimeError):
    """The local SuperLink or a ``flwr`` command failed; the message says what to do."""


class RunFailedError(SuperLinkError):
    """A submitted run did not finish with ``finished:completed``.

    Attributes
    ----------
    run_id : int | None
        The Flower run id, if the run was created.
    status : str
        Final Flower status (e.g. ``finished:failed``) or ``timeout``.
    log_tail : str
        The last lines of the run log.
    """

    def __init__(self, message: str, *, run_id: int | None, status: str, log_tail: str):
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.log_tail = log_tail


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0).

    There is an unavoidable race until the SuperLink binds it;
    :class:`LocalSuperLink` retries with a new port if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _venv_bin() -> Path:
    """Directory of the running interpreter's console scripts (not symlink-resolved)."""
    return Path(sys.executable).parent


def _executable(name: str) -> Path:
    path = _venv_bin() / name
    if not path.is_file():
        raise SuperLinkError(
            f"`{name}` not found at {path}. Install `flwr[simulation]==1.41.0` into the "
            f"environment of {sys.executable} (e.g. `pip install -e .` in the repo)."
        )
    return path


@dataclass(frozen=True)
class FlowerEnv:
    """Everything that isolates one local Flower deployment from the rest of the machine.

    Attributes
    ----------
    flwr_home : Path
        Private ``FLWR_HOME``: ``config.toml``, installed FABs (``apps/``), logs.
    port : int
        The single SuperLink HTTP port (Fleet, Control and Runtime APIs in flwr 1.41).
    ray_tmpdir : Path
        ``RAY_TMPDIR`` for the Ray cluster started by ``flwr-simulation``; must be short
        (see ``_MAX_RAY_TMPDIR_LEN``).
    host : str
        Loopback address the SuperLink binds to.
    connection : str
        Name of the SuperLink connection written to ``config.toml``.
    tag : str
        Value of :data:`TAG_ENV_VAR` inherited by every process we start.
    root_certificates : Path | None
        CA certificate that signed the SuperLink's TLS certificate, or ``None`` for a
        plain-HTTP loopback SuperLink (simulation and the insecure test deployment).
    """

    flwr_home: Path
    port: int
    ray_tmpdir: Path
    host: str = "127.0.0.1"
    connection: str = "medsynth-local"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    root_certificates: Path | None = None

    def __post_init__(self) -> None:
        """Validate values that would otherwise fail deep inside flwr or Ray."""
        if not _CONNECTION_NAME_RE.match(self.connection):
            raise ValueError(f"Connection name {self.connection!r} must match [A-Za-z0-9_-]+.")
        if not 0 < self.port < 65536:
            raise ValueError(f"Port {self.port} is outside 1..65535.")
        if len(str(self.ray_tmpdir)) > _MAX_RAY_TMPDIR_LEN:
            raise ValueError(
                f"ray_tmpdir {str(self.ray_tmpdir)!r} is longer than "
                f"{_MAX_RAY_TMPDIR_LEN} characters; Ray's AF_UNIX socket paths would "
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
        """Return the environment for SuperLink and ``flwr`` CLI subprocesses.

        Starts from ``base`` (default: ``os.environ``), removes variables that would
        reach shared resources and sets: our ``FLWR_HOME``; telemetry, update check and
        runtime dependency installation (``uv sync``, fails offline) off; Ray's temp dir
        and usage stats; the venv ``bin`` first on ``PATH``; and the process tag.
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
                "RAY_TMPDIR": str(self.ray_tmpdir),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                "PATH": os.pathsep.join([str(_venv_bin()), env.get("PATH", "")]),
                "NO_COLOR": "1",
                "COLUMNS": "200",
                "PYTHONUNBUFFERED": "1",
                TAG_ENV_VAR: self.tag,
            }
        )
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


def _read_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:  # gone, kernel thread, or not ours to read
        return b""


def find_tagged_pids(tag: str) -> set[int]:
    """Return live processes whose environment carries ``TAG_ENV_VAR=tag`` (Linux).

    Zombies have an empty ``/proc/PID/environ`` and are therefore not reported. The
    calling process and its parent are never reported.
    """
    needle = f"{TAG_ENV_VAR}={tag}".encode()
    exclude = {os.getpid(), os.getppid()}
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in exclude:
            continue
        if needle in _read_environ(pid).split(b"\0"):
            found.add(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def _signal_pids(pids: set[int], sig: signal.Signals, tag: str) -> None:
    """Send ``sig`` to each pid that still carries our tag (guards against PID reuse)."""
    needle = f"{TAG_ENV_VAR}={tag}".encode()
    for pid in pids:
        if needle not in _read_environ(pid).split(b"\0"):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_tagged_until_gone(tags: Iterable[str], sig: signal.Signals, wait_s: float) -> set[int]:
    """Send ``sig`` to every live process carrying one of ``tags``, again every 0.2 s, until none
    is left or ``wait_s`` passes; returns the PIDs still alive (empty when all are gone)."""
    tags = tuple(tags)
    deadline = time.monotonic() + wait_s
    while True:
        alive: set[int] = set()
        for tag in tags:
            pids = find_tagged_pids(tag)
            alive |= pids
            _signal_pids(pids, sig, tag)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


class FlowerConnection(Protocol):
    """What :func:`run_app` needs from a running SuperLink: its environment and folders.

    Satisfied by :class:`LocalSuperLink` (Simulation Engine) and by
    ``simulation.deployment.LocalDeployment`` (Deployment Engine).
    """

    @property
    def env(self) -> FlowerEnv:
        """Connection name, address, ``FLWR_HOME`` and subprocess environment for ``flwr``."""
        ...

    @property
    def flwr_home(self) -> Path:
        """The SuperLink's ``FLWR_HOME`` (holds ``config.toml``; ``flwr`` runs in it)."""
        ...

    @property
    def log_path(self) -> Path:
        """The SuperLink's own log, named in error messages."""
        ...


class LocalSuperLink:
    """A private ``flower-superlink --simulation`` for the lifetime of a ``with`` block.

    On enter: creates ``flwr_home``, picks a free port (unless given), starts the
    SuperLink from this interpreter's venv in a new session with its output in
    ``flwr_home/superlink.log``, waits for ``GET /health`` and writes the connection
    into ``flwr_home/config.toml``. On exit: SIGTERM to the SuperLink, then to every
    remaining tagged process (SuperExec, flwr-simulation, Ray), SIGKILL after
    ``stop_grace_s``, and raises :class:`SuperLinkError` if anything survives.

    Parameters
    ----------
    flwr_home : Path
        Private Flower home; created if missing.
    port : int | None
        Fixed port, or ``None`` for a free one (retried on a bind race).
    database : Path | None
        SQLite file for SuperLink state, or ``None`` for in-memory state.
    startup_timeout_s : float
        How long to wait for ``/health``.
    stop_grace_s : float
        Time between SIGTERM and SIGKILL on exit (Ray needs ~8 s mid-run).
    """

    _START_ATTEMPTS = 3

    def __init__(
        self,
        flwr_home: Path,
        *,
        port: int | None = None,
        database: Path | None = None,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        if not sys.platform.startswith("linux"):
            raise SuperLinkError("LocalSuperLink needs Linux (/proc is used to find processes).")
        self.flwr_home = Path(flwr_home).absolute()
        self.log_path = self.flwr_home / "superlink.log"
        self._fixed_port = port
        self._database = database
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._tag = uuid.uuid4().hex
        self._proc: subprocess.Popen[bytes] | None = None
        self._env: FlowerEnv | None = None
        self._ray_link: Path | None = None

    # ------------------------------------------------------------------ properties
    @property
    def env(self) -> FlowerEnv:
        """The :class:`FlowerEnv` of the running SuperLink."""
        if self._env is None:
            raise SuperLinkError("LocalSuperLink is not started; use it in a `with` block.")
        return self._env

    @property
    def pid(self) -> int:
        """PID (and process group id) of the ``flower-superlink`` process."""
        if self._proc is None:
            raise SuperLinkError("LocalSuperLink is not started; use it in a `with` block.")
        return self._proc.pid

    def owned_pids(self) -> set[int]:
        """Live processes started by this SuperLink (including Ray) and its ``flwr`` calls."""
        return find_tagged_pids(self._tag)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalSuperLink:
        """Start the SuperLink and wait until it is healthy."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop everything we started (see :meth:`stop`)."""
        self.stop()

    def start(self) -> None:
        """Start ``flower-superlink`` (see class docstring)."""
        if self._proc is not None:
            raise SuperLinkError("LocalSuperLink already started.")
        superlink = _executable("flower-superlink")
        _executable("flwr")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(1 if self._fixed_port is not None else self._START_ATTEMPTS):
            ray_tmpdir = self._ray_tmpdir()
            port = self._fixed_port if self._fixed_port is not None else free_port()
            env = FlowerEnv(flwr_home=self.flwr_home, port=port, ray_tmpdir=ray_tmpdir, tag=self._tag)
            cmd = [
                str(superlink),
                "--simulation",
                "--insecure",
                "--isolation",
                "subprocess",
                "--host",
                env.host,
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ]
            if self._database is not None:
                cmd += ["--database", str(self._database)]
            with self.log_path.open("wb") as log_fh:
                self._proc = subprocess.Popen(
                    cmd,
                    env=env.environ(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    cwd=self.flwr_home,
                    start_new_session=True,
                )
            self._env = env
            ready, last_error = self._wait_ready()
            if ready:
                env.write_config()
                return
            self.stop(raise_on_leftovers=False)
            if self._fixed_port is not None or "address already in use" not in last_error.lower():
                break
        self._env = None
        raise SuperLinkError(
            f"flower-superlink did not become healthy within {self._startup_timeout_s:.0f} s. "
            f"Check {self.log_path}. Last lines:\n{last_error}"
        )

    def _ray_tmpdir(self) -> Path:
        """A short RAY_TMPDIR: ``flwr_home/ray``, via a /tmp symlink if that path is long."""
        target = self.flwr_home / "ray"
        target.mkdir(parents=True, exist_ok=True)
        if len(str(target)) <= _MAX_RAY_TMPDIR_LEN:
            return target
        link = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))
        link.rmdir()
        link.symlink_to(target, target_is_directory=True)
        self._ray_link = link
        return link

    def _wait_ready(self) -> tuple[bool, str]:
        """Poll ``/health`` until it answers 200, the process dies, or time runs out."""
        if self._proc is None or self._env is None:
            return False, "not started"
        url = f"http://{self._env.address}/health"
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False, _tail(self.log_path)
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return True, ""
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False, _tail(self.log_path)

    def stop(self, *, raise_on_leftovers: bool = True) -> None:
        """Stop the SuperLink and every tagged descendant; verify none is left.

        Order: SIGTERM the SuperLink's process group (it terminates its SuperExec),
        wait; SIGTERM all remaining tagged processes (flwr-simulation, Ray), wait up
        to ``stop_grace_s``; SIGKILL whatever is left; reap our child.
        """
        proc = self._proc
        grace = self._stop_grace_s
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        signal_tagged_until_gone([self._tag], signal.SIGTERM, grace)
        leftovers = self.owned_pids()
        if leftovers or (proc is not None and proc.poll() is None):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            signal_tagged_until_gone([self._tag], signal.SIGKILL, 5.0)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        if self._ray_link is not None:
            self._ray_link.unlink(missing_ok=True)
            self._ray_link = None
        remaining = self.owned_pids()
        alive_link = proc is not None and proc.poll() is None
        self._proc = None
        if raise_on_leftovers and (remaining or alive_link):
            listing = "\n".join(f"  {pid}: {_cmdline(pid)}" for pid in sorted(remaining))
            raise SuperLinkError(
                "Processes started by LocalSuperLink survived SIGKILL (uninterruptible "
                f"I/O?). Inspect with `ps -o pid,stat,cmd -p PID`:\n{listing}"
            )



@dataclass(frozen=True)
class RunResult:
    """Outcome of :func:`run_app`.

    Attributes
    ----------
    run_id : int
        Flower run id.
    status : str
        Final status, ``finished:completed`` on success.
    exit_code : int
        Exit code of the ``flwr log --stream`` process (0 does *not* imply success).
    wall_s : float
        Seconds from submission to final status.
    log_path : Path
        Where the run's log was written.
    """

    run_id: int
    status: str
    exit_code: int
    wall_s: float
    log_path: Path


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


def _check_run_config(run_config: Mapping[str, Any]) -> None:
    for key, value in run_config.items():
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
    """Render overrides as one ``flwr run --run-config '...'`` string (for humans/logs).

    Strings are TOML-quoted (``k="v w"``; literal ``'...'`` if the value contains
    ``"`` or a backslash). flwr's parser splits on the regex
    ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` and cannot take a string with both quote kinds;
    :func:`run_app` therefore passes overrides as a TOML file instead.
    """
    _check_run_config(run_config)
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in run_config.items())


def _write_run_config_file(path: Path, run_config: Mapping[str, RunConfigValue]) -> Path:
    """Write overrides as TOML; flwr reads a single ``--run-config`` ending in ``.toml``."""
    _check_run_config(run_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
    return path


def _parse_json_output(stdout: str, what: str) -> dict[str, Any]:
    start = stdout.find("{")
    if start < 0:
        raise SuperLinkError(f"`{what}` printed no JSON. Output:\n{stdout[-2000:]}")
    try:
        data = json.loads(stdout[start:])
    except json.JSONDecodeError as err:
        raise SuperLinkError(f"`{what}` printed invalid JSON ({err}):\n{stdout[-2000:]}") from err
    if not isinstance(data, dict):
        raise SuperLinkError(f"`{what}` printed unexpected JSON: {data!r}")
    return data


def _flwr_json(args: list[str], link: FlowerConnection, timeout_s: float) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; raise unless it reports ``success``."""
    cmd = [str(_executable("flwr")), *args, "--format", "json"]
    what = "flwr " + " ".join(args[:2])
    try:
        done = subprocess.run(
            cmd,
            env=link.env.environ(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=max(timeout_s, 1.0),
            cwd=link.flwr_home,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise SuperLinkError(f"`{what}` did not answer within {timeout_s:.0f} s.") from err
    data = _parse_json_output(done.stdout if "{" in done.stdout else done.stdout + done.stderr, what)
    if not data.get("success", False):
        raise SuperLinkError(f"`{what}` failed (exit {done.returncode}): {data.get('error-message', data)}")
    return data


def _run_status(link: FlowerConnection, run_id: int, timeout_s: float) -> tuple[str, str]:
    data = _flwr_json(["ls", link.env.connection, "--run-id", str(run_id)], link, timeout_s)
    runs = data.get("runs") or []
    if not runs:
        raise SuperLinkError(f"`flwr ls` returned no entry for run {run_id}.")
    run = runs[0]
    return str(run.get("status", "unknown")), str(run.get("status-details", ""))


def _pump_lines(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _kill_session(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def run_app(
    app_dir: Path,
    link: FlowerConnection,
    *,
    run_config: Mapping[str, RunConfigValue],
    num_supernodes: int | None = None,
    num_cpus_per_node: int = 1,
    log_path: Path,
    timeout_s: float,
    on_line: Callable[[str], None] | None = None,
) -> RunResult:
    """Submit ``app_dir`` to ``link`` with ``flwr run`` and follow it to the end.

    Steps: ``flwr run APP CONN --run-config FILE.toml [--federation-config
    'num-supernodes=N client-resources-num-cpus=C'] --format json`` (run id), then
    ``flwr log RUN CONN --stream`` (ends when the run is finished; each line, ANSI
    colours stripped, goes to ``log_path`` and ``on_line``), then ``flwr ls CONN
    --run-id RUN --format json`` (final status).

    ``num_supernodes`` (and ``num_cpus_per_node``) size the Simulation Engine's virtual
    federation. Pass ``None`` (the default) for a Deployment Engine connection: no
    ``--federation-config`` is sent, and the federation is whichever SuperNodes are connected.

    Override keys must exist in ``[tool.flwr.app.config]`` (else the SuperLink rejects
    the run) and should keep the default's type (flwr does not convert).

    Raises
    ------
    RunFailedError
        The run ended other than ``finished:completed`` or exceeded ``timeout_s``
        (the run is then stopped with ``flwr stop``). Carries the log tail.
    SuperLinkError
        Submission or a ``flwr`` command failed.
    """
    app_dir = Path(app_dir).absolute()
    if not (app_dir / "pyproject.toml").is_file():
        raise SuperLinkError(f"{app_dir} has no pyproject.toml; pass the Flower App directory.")
    if (num_supernodes is not None and num_supernodes < 1) or num_cpus_per_node < 1:
        raise ValueError("num_supernodes and num_cpus_per_node must be >= 1 (whole CPUs).")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive.")
    env = link.env
    t0 = time.monotonic()
    deadline = t0 + timeout_s

    cfg_file = _write_run_config_file(link.flwr_home / "run-configs" / f"{uuid.uuid4().hex[:12]}.toml", run_config)
    submit = ["run", str(app_dir), env.connection]
    if run_config:
        submit += ["--run-config", str(cfg_file)]
    if num_supernodes is not None:
        submit += [
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus_per_node}",
        ]
    data = _flwr_json(submit, link, deadline - time.monotonic())
    run_id = int(data["run-id"])

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(_executable("flwr")), "log", str(run_id), env.connection, "--stream"],
        env=env.environ(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        cwd=link.flwr_home,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    if proc.stdout is None:  # pragma: no cover - PIPE always gives a stream
        raise SuperLinkError("Could not capture `flwr log` output.")
    pump = threading.Thread(target=_pump_lines, args=(proc.stdout, lines), daemon=True)
    pump.start()
    timed_out = False
    try:
        with log_path.open("w", encoding="utf-8") as log_fh:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    item = lines.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                if item is None:
                    break
                text = _ANSI_RE.sub("", item).rstrip("\n")
                log_fh.write(text + "\n")
                log_fh.flush()
                if on_line is not None:
                    on_line(text)
        if not timed_out:
            # EOF seen; let `flwr log` exit on its own so its exit code is meaningful.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10.0)
    finally:
        _kill_session(proc)
        pump.join(timeout=5.0)

    if timed_out:
        try:
            _flwr_json(["stop", str(run_id), env.connection], link, 30.0)
        except SuperLinkError as err:
            with log_path.open("a", encoding="utf-8") as log_fh:
                log_fh.write(f"[medsynth] flwr stop failed: {err}\n")
        raise RunFailedError(
            f"Run {run_id} exceeded {timeout_s:.0f} s and was stopped. Log: {log_path}\n{_tail(log_path)}",
            run_id=run_id,
            status="timeout",
            log_tail=_tail(log_path),
        )

    # The stream ends when the run is finished; poll briefly in case it broke early.
    status, details = _run_status(link, run_id, max(deadline - time.monotonic(), 10.0))
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status, details = _run_status(link, run_id, max(deadline - time.monotonic(), 10.0))
    wall_s = time.monotonic() - t0
    if not status.startswith("finished"):
        with contextlib.suppress(SuperLinkError):
            _flwr_json(["stop", str(run_id), env.connection], link, 30.0)
        status = f"timeout ({status})"
    if status != "finished:completed":
        tail = _tail(log_path)
        raise RunFailedError(
            f"Run {run_id} ended with status {status!r} ({details}). Log: {log_path}; "
            f"SuperLink log: {link.log_path}\n{tail}",
            run_id=run_id,
            status=status,
            log_tail=tail,
        )
    return RunResult(
        run_id=run_id,
        status=status,
        exit_code=proc.returncode if proc.returncode is not None else -1,
        wall_s=wall_s,
        log_path=log_path,
    )
