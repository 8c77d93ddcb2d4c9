"""The ``flwr`` CLI against a SuperLink we started: JSON calls and a whole run (``flwr run``).

``flwr run``/``flwr ls --format json`` exit with 0 even on failure; the JSON ``success`` field
and the run status (``finished:completed|failed|stopped``) are the truth. Every call runs in
the connection's ``FLWR_HOME`` with its environment, so it reaches only that SuperLink.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from common.flower.commands import RunConfigValue, write_run_config_file
from common.flower.env import FlowerEnv, executable
from common.flower.errors import RunFailedError, SuperLinkError
from common.flower.fab import stage_app
from common.flower.processes import tail

__all__ = ["FlowerConnection", "RunResult", "flwr_json", "parse_json_output", "run_app"]

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FlowerConnection(Protocol):
    """What the ``flwr`` calls need from a running SuperLink: its environment and folders.

    Satisfied by the server daemon (``server.daemon.SuperLinkDaemon``) and by the simulation
    harness's local SuperLinks (Simulation and Deployment Engine).
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


def parse_json_output(stdout: str, what: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` call printed (after any banner text)."""
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


def flwr_json(args: list[str], link: FlowerConnection, timeout_s: float) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against ``link``; raise unless it reports ``success``."""
    cmd = [str(executable("flwr")), *args, "--format", "json"]
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
    data = parse_json_output(done.stdout if "{" in done.stdout else done.stdout + done.stderr, what)
    if not data.get("success", False):
        raise SuperLinkError(f"`{what}` failed (exit {done.returncode}): {data.get('error-message', data)}")
    return data


def _run_status(link: FlowerConnection, run_id: int, timeout_s: float) -> tuple[str, str]:
    data = flwr_json(["ls", link.env.connection, "--run-id", str(run_id)], link, timeout_s)
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
    """SIGKILL the ``flwr log`` process group we started (it holds no state worth a SIGTERM)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _follow_log(run_id: int, link: FlowerConnection, log_path: Path, deadline: float,
                on_line: Callable[[str], None] | None) -> tuple[bool, int]:
    """``flwr log RUN CONN --stream`` into ``log_path`` (ANSI colours stripped) and ``on_line``
    until the stream ends or ``deadline``; returns (timed out, exit code of ``flwr log``)."""
    env = link.env
    proc = subprocess.Popen(
        [str(executable("flwr")), "log", str(run_id), env.connection, "--stream"],
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
    return timed_out, proc.returncode if proc.returncode is not None else -1


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

    cfg_file = write_run_config_file(link.flwr_home / "run-configs" / f"{uuid.uuid4().hex[:12]}.toml", run_config)
    staged = stage_app(app_dir, link.flwr_home / "staged-app")  # the same FAB, built without walking .venv
    submit = ["run", str(staged), env.connection]
    if run_config:
        submit += ["--run-config", str(cfg_file)]
    if num_supernodes is not None:
        submit += [
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus_per_node}",
        ]
    data = flwr_json(submit, link, deadline - time.monotonic())
    run_id = int(data["run-id"])

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out, exit_code = _follow_log(run_id, link, log_path, deadline, on_line)

    if timed_out:
        try:
            flwr_json(["stop", str(run_id), env.connection], link, 30.0)
        except SuperLinkError as err:
            with log_path.open("a", encoding="utf-8") as log_fh:
                log_fh.write(f"[medsynth] flwr stop failed: {err}\n")
        raise RunFailedError(
            f"Run {run_id} exceeded {timeout_s:.0f} s and was stopped. Log: {log_path}\n{tail(log_path)}",
            run_id=run_id,
            status="timeout",
            log_tail=tail(log_path),
        )

    # The stream ends when the run is finished; poll briefly in case it broke early.
    status, details = _run_status(link, run_id, max(deadline - time.monotonic(), 10.0))
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status, details = _run_status(link, run_id, max(deadline - time.monotonic(), 10.0))
    wall_s = time.monotonic() - t0
    if not status.startswith("finished"):
        with contextlib.suppress(SuperLinkError):
            flwr_json(["stop", str(run_id), env.connection], link, 30.0)
        status = f"timeout ({status})"
    if status != "finished:completed":
        text = tail(log_path)
        raise RunFailedError(
            f"Run {run_id} ended with status {status!r} ({details}). Log: {log_path}; "
            f"SuperLink log: {link.log_path}\n{text}",
            run_id=run_id,
            status=status,
            log_tail=text,
        )
    return RunResult(run_id=run_id, status=status, exit_code=exit_code, wall_s=wall_s, log_path=log_path)
