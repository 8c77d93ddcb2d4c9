"""Run a Flower App on a private, local SuperLink (Simulation Engine) via ``flwr run``.

Why this module exists
----------------------
``flwr run`` against the magic ``:local:`` connection starts a *shared*, detached
SuperLink on fixed ports (39091/39093) under ``~/.flwr`` that outlives the command.
Tests and the ``medsynth`` CLI must not use or leave anything machine-wide, so
:class:`LocalSuperLink` starts its own ``flower-superlink --simulation`` with its own
``FLWR_HOME``, its own free port and its own Ray temp dir, writes a named connection into
``$FLWR_HOME/config.toml``; runs are submitted with :func:`common.flower.run_app`, and
:meth:`LocalSuperLink.stop` stops exactly the processes it started.

What is particular to the Simulation Engine (the rest is :mod:`common.flower`):

* The SuperLink spawns ``flower-superexec`` with ``start_new_session=True``; the
  SuperExec spawns ``flwr-simulation``, which starts a whole Ray cluster (gcs_server,
  raylet, agents, workers) in yet other sessions. All of them inherit the process tag
  (verified for Ray workers), which is how stopping finds them.
* Ray needs a short ``RAY_TMPDIR`` (its AF_UNIX socket paths must fit in 107 bytes):
  ``FLWR_HOME/ray``, through a symlink under ``/tmp`` when that path is too long.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

from common.flower import (
    MAX_RAY_TMPDIR_LEN,
    FlowerEnv,
    NotHealthy,
    SuperLinkError,
    describe_pids,
    executable,
    find_tagged_pids,
    free_port,
    spawn,
    superlink_command,
    terminate_then_kill,
    wait_healthy,
)

__all__ = ["LocalSuperLink"]

_BIND_ERROR = "address already in use"


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
    ray_address : str | None
        ``HOST:PORT`` of an existing Ray cluster for the Simulation Engine to join
        (``simulation.ray_cluster``), or ``None`` for a private Ray started by ``flwr-simulation``.
        A joined cluster's processes are not ours: stopping leaves them running (the workers of our
        run end with its driver, ``flwr-simulation``).
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
        ray_address: str | None = None,
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
        self._ray_address = ray_address

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
        """Start ``flower-superlink --simulation`` (see class docstring)."""
        if self._proc is not None:
            raise SuperLinkError("LocalSuperLink already started.")
        executable("flower-superlink")
        executable("flwr")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        last_tail = ""
        for _ in range(1 if self._fixed_port is not None else self._START_ATTEMPTS):
            port = self._fixed_port if self._fixed_port is not None else free_port()
            env = FlowerEnv(flwr_home=self.flwr_home, port=port, ray_tmpdir=self._ray_tmpdir(), tag=self._tag,
                            ray_address=self._ray_address)
            cmd = superlink_command(host=env.host, port=port, simulation=True, database=self._database)
            self._proc = spawn(cmd, env.environ(), self.log_path, cwd=self.flwr_home)
            self._env = env
            try:
                wait_healthy(self._proc, env, log_path=self.log_path, timeout_s=self._startup_timeout_s)
            except NotHealthy as exc:
                last_tail = exc.log_tail
                self.stop(raise_on_leftovers=False)
                if self._fixed_port is not None or _BIND_ERROR not in last_tail.lower():
                    break
                continue
            env.write_config()
            return
        self._env = None
        raise SuperLinkError(
            f"flower-superlink did not become healthy within {self._startup_timeout_s:.0f} s. "
            f"Check {self.log_path}. Last lines:\n{last_tail}"
        )

    def _ray_tmpdir(self) -> Path:
        """A short RAY_TMPDIR: ``flwr_home/ray``, via a /tmp symlink if that path is long."""
        target = self.flwr_home / "ray"
        target.mkdir(parents=True, exist_ok=True)
        if len(str(target)) <= MAX_RAY_TMPDIR_LEN:
            return target
        link = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))
        link.rmdir()
        link.symlink_to(target, target_is_directory=True)
        self._ray_link = link
        return link

    def stop(self, *, raise_on_leftovers: bool = True) -> None:
        """Stop the SuperLink and every tagged descendant; verify none is left.

        :func:`common.flower.terminate_then_kill`: SIGTERM the SuperLink's process group (it
        terminates its SuperExec), then every remaining tagged process (flwr-simulation, Ray),
        SIGKILL after ``stop_grace_s``.
        """
        remaining = terminate_then_kill([self._proc], [self._tag], grace_s=self._stop_grace_s)
        self._proc = None
        if self._ray_link is not None:
            self._ray_link.unlink(missing_ok=True)
            self._ray_link = None
        if raise_on_leftovers and remaining:
            raise SuperLinkError(
                "Processes started by LocalSuperLink survived SIGKILL (uninterruptible "
                f"I/O?). Inspect with `ps -o pid,stat,cmd -p PID`:\n{describe_pids(remaining)}"
            )
