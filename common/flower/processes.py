"""Start, health-check and stop Flower daemons: only the processes we started, by PID and tag.

Process trees (flwr 1.41.0, Linux)::

    flower-superlink            our child, its own session (start_new_session), tag T
      └ flower-superexec        another session (the SuperLink uses start_new_session)
          └ flwr-serverapp      one per run (deployment) or flwr-simulation + a Ray cluster
    flower-supernode            our child, its own session, tag T'
      └ flower-superexec        same process group as its SuperNode
          └ flwr-clientapp      one per *message*, same process group

Killing our child's process group therefore does not reach everything: after a SIGTERM
mid-run the SuperLink's SuperExec, ServerApp or Ray processes were left orphaned. Every
descendant inherits the environment tag (:data:`common.flower.env.TAG_ENV_VAR`), so stopping
also scans ``/proc/*/environ`` for the tag and signals exactly those processes, re-checking
the tag just before each signal (a reused PID is never signalled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from common.flower.env import TAG_ENV_VAR, FlowerEnv
from common.flower.errors import CertificateNotTrusted, DaemonExited, HealthTimeout

__all__ = [
    "describe_pids",
    "find_tagged_pids",
    "kill_now",
    "signal_pids",
    "signal_tagged_until_gone",
    "spawn",
    "tail",
    "terminate_then_kill",
    "wait_healthy",
]

#: Seconds we wait for processes to disappear after SIGKILL (they only need to be scheduled).
_KILL_WAIT_S = 5.0
_POLL_S = 0.2


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises ``KeyboardInterrupt`` in the main thread, as Ctrl-C does, so the
    ``finally`` blocks and context managers that stop the Flower processes we started run (the
    default action would end this process and leave them running). The previous handler after."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


def spawn(cmd: Sequence[str], environ: Mapping[str, str], log_path: Path, *, cwd: Path,
          append: bool = False) -> subprocess.Popen[bytes]:
    """Start one daemon in a new session, stdin closed, stdout and stderr into ``log_path``.

    ``environ`` should come from :meth:`FlowerEnv.environ` so that the daemon and all its
    descendants carry the process tag. ``append`` keeps earlier output (a supervised daemon
    that restarts), otherwise the log starts empty.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log_fh:
        return subprocess.Popen(
            list(cmd),
            env=dict(environ),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def wait_healthy(proc: subprocess.Popen[bytes], env: FlowerEnv, *, log_path: Path, timeout_s: float,
                 name: str = "flower-superlink") -> None:
    """Wait until the SuperLink ``proc`` answers ``GET {env.base_url}/health`` with 200.

    With ``env.root_certificates`` the request goes over TLS and the certificate must verify
    against that CA for ``env.host``.

    Raises
    ------
    DaemonExited
        ``proc`` exited first (e.g. its port was taken; the log tail says so).
    CertificateNotTrusted
        It answered with a certificate the CA does not vouch for (retrying cannot help).
    HealthTimeout
        No 200 within ``timeout_s``.
    """
    url = f"{env.base_url}/health"
    context = None if env.root_certificates is None else ssl.create_default_context(
        cafile=str(env.root_certificates))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = tail(log_path)
            raise DaemonExited(f"{name} exited with code {proc.returncode} while starting. "
                               f"Last lines of {log_path}:\n{text}",
                               log_path=log_path, log_tail=text, returncode=proc.returncode)
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(getattr(exc, "reason", None), ssl.SSLCertVerificationError):
                raise CertificateNotTrusted(
                    f"{name}'s certificate does not verify for {env.host} against {env.root_certificates}: {exc}",
                    log_path=log_path, log_tail=tail(log_path),
                ) from exc
        time.sleep(_POLL_S)
    text = tail(log_path)
    raise HealthTimeout(f"{name} did not answer {url} within {timeout_s:.0f} s. Check {log_path}. "
                        f"Last lines:\n{text}", log_path=log_path, log_tail=text)


def _read_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:  # gone, kernel thread, or not ours to read
        return b""


def _has_tag(pid: int, tag: str) -> bool:
    return f"{TAG_ENV_VAR}={tag}".encode() in _read_environ(pid).split(b"\0")


def find_tagged_pids(tag: str) -> set[int]:
    """Return live processes whose environment carries ``TAG_ENV_VAR=tag`` (Linux).

    Zombies have an empty ``/proc/PID/environ`` and are therefore not reported. The
    calling process and its parent are never reported.
    """
    exclude = {os.getpid(), os.getppid()}
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in exclude and _has_tag(int(entry.name), tag):
            found.add(int(entry.name))
    return found


def signal_pids(pids: Iterable[int], sig: signal.Signals, tag: str) -> None:
    """Send ``sig`` to each pid that still carries ``tag`` (guards against PID reuse)."""
    for pid in pids:
        if _has_tag(pid, tag):
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
            signal_pids(pids, sig, tag)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def _signal_groups(procs: Iterable[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Signal the process group of each child still running (not yet reaped: its PID is ours)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)


def _reap(procs: Iterable[subprocess.Popen[bytes]], deadline: float) -> None:
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))


def _survivors(procs: Sequence[subprocess.Popen[bytes]], tags: Sequence[str]) -> set[int]:
    alive = {proc.pid for proc in procs if proc.poll() is None}
    for tag in tags:
        alive |= find_tagged_pids(tag)
    return alive


def terminate_then_kill(procs: Iterable[subprocess.Popen[bytes] | None], tags: Iterable[str], *,
                        grace_s: float) -> set[int]:
    """Stop daemons we started and everything they started; return the PIDs that survived.

    Order: SIGTERM the process group of each child in ``procs`` (a SuperNode takes its
    SuperExec and ClientApps with it; a SuperLink stops its SuperExec), wait up to
    ``grace_s``; SIGTERM every remaining process carrying one of ``tags`` (the SuperLink's
    ServerApp, ``flwr-simulation`` and Ray live in other sessions), again for up to
    ``grace_s``; then SIGKILL whatever is left; reap the children. An empty result means
    nothing we started is alive.
    """
    children = [p for p in procs if p is not None]
    tags = tuple(tags)
    _signal_groups(children, signal.SIGTERM)
    _reap(children, time.monotonic() + grace_s)
    signal_tagged_until_gone(tags, signal.SIGTERM, grace_s)
    if _survivors(children, tags):
        return kill_now(children, tags)
    _reap(children, time.monotonic() + _KILL_WAIT_S)
    return _survivors(children, tags)


def kill_now(procs: Iterable[subprocess.Popen[bytes] | None], tags: Iterable[str]) -> set[int]:
    """SIGKILL daemons we started and everything carrying ``tags`` (a crash, or the last resort);
    return the PIDs that survived (uninterruptible I/O)."""
    children = [p for p in procs if p is not None]
    tags = tuple(tags)
    _signal_groups(children, signal.SIGKILL)
    signal_tagged_until_gone(tags, signal.SIGKILL, _KILL_WAIT_S)
    _reap(children, time.monotonic() + _KILL_WAIT_S)
    return _survivors(children, tags)


def describe_pids(pids: Iterable[int]) -> str:
    """One line per PID with its command line, for error messages about survivors."""
    lines = []
    for pid in sorted(pids):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]
        except OSError:
            cmd = "?"
        lines.append(f"  {pid}: {cmd}")
    return "\n".join(lines)
