"""The ClientApp fork server: each Flower message still gets its own process, without the imports.

Why: a SuperNode in ``subprocess`` isolation starts one ``flwr-clientapp`` process per *message*
(train, the four secure-aggregation stages, the final model). Each one imports Flower's ClientApp
runtime (~2.5 s of CPU) and, for training, torch and Opacus (~6 s more) before it does a second of
work; four hospitals on a 2-core machine spent more time importing than training. Flower 1.41's
pre-started workers ("warm executors") exist only for its Kubernetes executor.

What this does instead, in the spirit of Python's ``multiprocessing`` fork server: next to each
SuperNode runs one *fork server* process that has imported the third-party libraries
(:data:`PREIMPORTS`: torch, Opacus, NumPy, SciPy, Flower's ClientApp runtime …) and nothing
else. The ``flwr-clientapp`` that the SuperExec starts for a message is our small wrapper
(:func:`write_wrapper`): it imports only the standard library, connects to the fork server's
Unix socket, hands over its argv, environment, working folder and its stdin/stdout/stderr (file
descriptors passed with ``SCM_RIGHTS``), and waits. The fork server forks; the child takes those
descriptors and that environment and runs Flower's ClientApp process exactly as the plain
command would (through the app allow-list of :mod:`client.fab_gate`), then exits; its exit
status goes back to the wrapper, which exits with it.

What stays as it was:

- Isolation. Every message runs in a fresh process; nothing a ClientApp does survives it. The
  fork server never imports the app's code (``client``, ``common``, … are refused in it, see
  :func:`check_nothing_of_ours`): the app bundle that the gate accepted is the code that runs, and
  the fork server holds no data, keys or results, only library code.
- Randomness. A forked child inherits its parent's memory, random generators included. Python's
  ``random`` reseeds itself after a fork and the kernel's generator (``os.urandom``, ``secrets``,
  OpenSSL) is per call; torch's and NumPy's global generators are reseeded from the kernel in
  every child (:func:`reseed_in_child`). Secure-aggregation keys and masks, the DP noise and the
  training's sampling and latent seeds come from ``secrets``/OpenSSL in any case.
- Lifetime. :func:`launch_supernode` starts the fork server as a child of the process that then
  becomes the SuperNode (:func:`become_supernode`), in the SuperNode's process group and with its environment
  (so its process tag): stopping the SuperNode's group or its tag stops the fork server and every
  ClientApp, and a fork server whose SuperNode is gone exits.
- Access. The socket lies in a fresh folder of mode 0700, and a peer whose user id is not ours
  (``SO_PEERCRED``) is refused.
- Failure. If the fork server cannot be reached, the wrapper says so on the SuperNode's log and
  runs the ClientApp itself, as Flower would have.

This file and :mod:`client.fab_gate` import only the standard library at module level and are
loaded by file path (never as ``client.…``): the app bundle's own ``client`` package must be the
one that Flower imports in the child.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType

#: The environment variable through which the SuperNode's ClientApps find the fork server's socket.
SOCKET_ENV = "MEDSYNTH_CLIENTAPP_FORKSERVER"
#: Imported once by the fork server: the heavy third-party libraries a ClientApp uses. Two are
#: imported late by the libraries themselves, so they are named here: ``httpcore`` when Flower's
#: ClientApp makes its HTTP client for the SuperNode (every message), and ``torch._dynamo`` when
#: training makes its first ``torch.optim`` optimizer (``Optimizer.__init__`` runs under
#: ``torch._disable_dynamo``). In a forked child they cost 0.28 s and 0.32 s of CPU per message.
PREIMPORTS = (
    "numpy", "scipy.stats", "torch", "torch._dynamo", "opacus", "safetensors.torch", "PIL.Image", "pydicom",
    "cryptography.x509", "httpcore", "flwr.app", "flwr.clientapp", "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
#: Top-level packages of this repository; the app bundle brings its own copy, so the fork server must not import them.
OURS = ("client", "common", "server", "simulation", "medsynth")
_HEADER = struct.Struct("!I")  # length of the JSON request that follows
_MAX_REQUEST = 1 << 20  # bytes; an environment of a few KB is normal
_POLL_S = 0.2


class ForkServerError(RuntimeError):
    """The fork server could not start a ClientApp (the wrapper then runs it itself)."""


# ---------------------------------------------------------------------------------------------
# the child: one ClientApp process


def _gate() -> ModuleType:
    """:mod:`client.fab_gate`, loaded by path like this file."""
    name = "medsynth_fab_gate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("fab_gate.py"))
        if spec is None or spec.loader is None:
            raise ForkServerError(f"cannot load {Path(__file__).with_name('fab_gate.py')}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_clientapp(argv: Sequence[str]) -> None:
    """Flower's ClientApp process for ``argv`` (``flwr-clientapp --token …``), behind the app allow-list."""
    sys.argv = [*argv]
    _gate().main()


def reseed_in_child() -> None:
    """Seed a forked child's global generators from the kernel, as a fresh interpreter does.

    A fork copies its parent's generator states: without this, every message's process would
    continue torch's global stream from the same point (torch seeds it from the OS once per
    interpreter). Python's ``random`` reseeds itself after a fork. Training itself draws its
    seeds from ``secrets`` (``common.dp.train``) and the DP noise from ChaCha20 keyed by the OS,
    so this keeps the rest, e.g. a library's own use of the global generators, as fresh as before.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _become_clientapp(request: Request, fds: Sequence[int], closing: Sequence[socket.socket]) -> None:
    """In the forked child: take the wrapper's descriptors, environment and folder, run, exit.

    Never returns: whatever happens ends in ``os._exit``, so a failure here can never run on as a
    second fork server (or remove the real one's socket on its way out).
    """
    code = 1
    try:
        for sock in closing:
            sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request.env)
        os.chdir(request.cwd)
        reseed_in_child()
        run_clientapp(request.argv)
        code = 0
    except SystemExit as exc:  # sys.exit(n) or sys.exit("message"), as the plain command would end
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------------------------------------
# the fork server


def check_nothing_of_ours() -> None:
    """Refuse to serve if this process imported any of this repository's packages (:data:`OURS`)."""
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in OURS)
    if loaded:
        raise ForkServerError(f"the fork server imported {loaded[:5]}; the app bundle must bring that code itself")


def preimport() -> None:
    """Import :data:`PREIMPORTS` and the app allow-list, and nothing of this repository's packages;
    then freeze what was imported out of the garbage collector's reach.

    The imports leave about 420,000 objects that Python's cyclic garbage collector tracks. A
    forked child inherits them, and its first full collections walk all of them: making one HTTP
    client took 276 ms of CPU in a child of a fork server without ``gc.freeze`` and 41 ms with it
    (without ``httpcore`` preimported). ``gc.freeze`` (Python's documentation recommends it before
    ``fork`` for this reason) moves them to a permanent generation that collections skip; they
    are module-level objects that live as long as the process anyway. Objects a child makes are
    collected as usual.
    """
    for name in PREIMPORTS:
        importlib.import_module(name)
    _gate()
    check_nothing_of_ours()
    gc.collect()
    gc.freeze()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass(frozen=True)
class Request:
    """What a wrapper asks for: one ClientApp run with its argv, environment and working folder."""

    argv: list[str]
    env: dict[str, str]
    cwd: str

    def to_bytes(self) -> bytes:
        """The length-prefixed JSON the wrapper sends (:meth:`read` reads it)."""
        payload = json.dumps({"argv": self.argv, "env": self.env, "cwd": self.cwd}).encode()
        return _HEADER.pack(len(payload)) + payload

    @classmethod
    def read(cls, conn: socket.socket) -> tuple[Request, list[int]]:
        """One request and, with its first bytes, the wrapper's three descriptors (stdin, stdout, stderr)."""
        data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_REQUEST, 3)
        try:
            while len(data) < _HEADER.size:
                data += _more(conn)
            (length,) = _HEADER.unpack_from(data)
            if length > _MAX_REQUEST:
                raise ForkServerError("request too long")
            while len(data) < _HEADER.size + length:
                data += _more(conn)
            if len(fds) != 3:
                raise ForkServerError(f"expected 3 file descriptors, got {len(fds)}")
            raw = json.loads(data[_HEADER.size:_HEADER.size + length])
            argv, env, cwd = (raw.get(k) for k in ("argv", "env", "cwd")) if isinstance(raw, dict) else (None,) * 3
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(env, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
                    and isinstance(cwd, str)):
                raise ForkServerError("malformed request")
            return cls(argv, env, cwd), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


def _more(conn: socket.socket) -> bytes:
    chunk = conn.recv(_MAX_REQUEST)
    if not chunk:
        raise ForkServerError("connection closed mid-request")
    return chunk


class ForkServer:
    """Accepts wrapper connections on ``listener`` and forks one ClientApp per connection."""

    def __init__(self, listener: socket.socket, parent_pid: int) -> None:
        self.listener = listener
        self.parent_pid = parent_pid
        self.children: dict[int, socket.socket] = {}  # ClientApp pid → its wrapper's connection
        self.abandoned: set[int] = set()  # ClientApps whose wrapper is gone (signalled, not yet reaped)

    def serve(self) -> None:
        """Until the SuperNode (our parent) is gone, or SIGTERM; the ClientApps still running get SIGTERM."""
        try:
            while os.getppid() == self.parent_pid:
                watched = [self.listener, *(c for p, c in self.children.items() if p not in self.abandoned)]
                readable, _, _ = select.select(watched, [], [], _POLL_S)
                for sock in readable:
                    if sock is self.listener:
                        self._accept()
                        continue
                    for pid, conn in list(self.children.items()):  # a wrapper went away: its ClientApp goes too
                        if conn is sock:
                            self.abandoned.add(pid)
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGTERM)
                self._reap()
        finally:
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            if _peer_uid(conn) != os.getuid():
                conn.close()
                return
            request, fds = Request.read(conn)
        except (OSError, ValueError, ForkServerError) as exc:
            print(f"medsynth fork server: refused a request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become_clientapp(request, fds, [self.listener, conn, *self.children.values()])
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        with contextlib.suppress(OSError):
            conn.sendall(f"pid {pid}\n".encode())

    def _reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            conn = self.children.pop(pid)
            self.abandoned.discard(pid)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def socket_path() -> Path:
    """A fresh socket path in a new folder of mode 0700 (short: AF_UNIX paths stop at 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="medsynth-clientapp-")) / "forkserver.sock"


def launch_supernode(command: Sequence[str]) -> None:
    """Start the fork server, then run ``command`` (the SuperNode) in this process (:func:`become_supernode`).

    The socket listens before the fork, so a ClientApp that connects while the libraries are
    still being imported waits in the queue instead of failing. Without a place for the socket
    (no writable temporary folder), the SuperNode starts without a fork server and says so.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = socket_path()
        listener.bind(str(path))
        listener.listen(64)
    except OSError as exc:
        listener.close()
        print(f"medsynth: no ClientApp fork server ({exc}); each ClientApp starts on its own", file=sys.stderr,
              flush=True)
        become_supernode(command)
    supernode_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:  # the fork server: its parent is about to become the SuperNode
        code = 0
        try:
            signal.signal(signal.SIGTERM, _stop_on_signal)
            started = time.monotonic()
            preimport()
            took = time.monotonic() - started
            print(f"medsynth fork server (pid {os.getpid()}): libraries imported in {took:.1f} s; each ClientApp "
                  "is forked from here", file=sys.stderr, flush=True)
            ForkServer(listener, supernode_pid).serve()
        except (KeyboardInterrupt, SystemExit):
            pass
        except BaseException as exc:
            print(f"medsynth fork server stopped: {exc!r}; ClientApps now start on their own", file=sys.stderr,
                  flush=True)
            code = 1
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                path.unlink()
                path.parent.rmdir()
        os._exit(code)
    listener.close()
    os.environ[SOCKET_ENV] = str(path)
    become_supernode(command)


# --- polling -------------------------------------------------------------------------------------
# A message reaches a ClientApp through two polls on the hospital's side, both from Flower 1.41:
# the SuperNode asks the SuperLink for a message, sleeping a fixed 3 s after each empty answer
# (``flwr.supernode.start_client_internal``, no setting), and its SuperExec asks the SuperNode for
# a task to launch every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (default 1). Each stage of
# a round (train, key set-up, mask, unmask, final model) waits for both, on average 2 s, more than
# the work of every stage but training. A pull is one authenticated HTTPS request that costs the
# SuperLink about 11 ms of CPU (measured: 3 idle hospitals pulling every 0.5 s cost it 2.1 s of CPU
# in 30 s, against 0.6 s at Flower's 3 s), so polling fast all the time would not scale to a large
# consortium. The stages of a round follow each other closely and runs are far apart, so the
# SuperNode here backs off instead: right after it handled a message it pulls again within
# SUPERNODE_FIRST_POLL_S, and each empty answer doubles the pause, up to Flower's 3 s. The wait
# for the next stage is then at most about the time since the last one; an idle hospital polls
# as Flower's does. While a message is handled the loop also waits, 0.5 s at a time, for the
# ClientApp's reply and its objects in the SuperNode's own memory (no request leaves the
# process); those waits are cut to HANDLING_POLL_S, so a reply leaves within 0.05 s of being made.

#: The SuperNode's first pause after a message; doubled after each empty pull up to Flower's own.
SUPERNODE_FIRST_POLL_S = 0.25
FLOWER_IDLE_SLEEP_S = 3.0  # the SuperNode loop's sleep after an empty pull (flwr 1.41)
BUSY_PULL_S = 1.0  # a pull-to-pull gap longer than this (besides the pause) means a message was handled
#: The SuperNode's pause while it waits for a ClientApp's reply in its own state (Flower's: 0.5 s).
HANDLING_POLL_S = 0.05
#: The SuperExec's pause between two asks for a ClientApp to launch (Flower's default: 1 s).
SUPEREXEC_POLL_S = 0.5
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by flwr.supercore.superexec.run_superexec


class BriskClock:
    """The ``time`` module as Flower's SuperNode loop sees it here: the same, but its idle sleep
    backs off from :data:`SUPERNODE_FIRST_POLL_S` after each handled message, and its waits for
    a reply last :data:`HANDLING_POLL_S` (see above).
    Installed only into ``flwr.supernode.start_client_internal``."""

    def __init__(self) -> None:
        self._pause = SUPERNODE_FIRST_POLL_S
        self._returned: float | None = None  # when the last idle sleep ended

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < FLOWER_IDLE_SLEEP_S:  # a wait while a message is handled (its reply, its objects)
            self._pause = SUPERNODE_FIRST_POLL_S
            time.sleep(min(seconds, HANDLING_POLL_S))
            return
        if self._returned is not None and time.monotonic() - self._returned > BUSY_PULL_S:
            self._pause = SUPERNODE_FIRST_POLL_S  # the last pull brought a message (it took a while)
        time.sleep(min(self._pause, seconds))
        self._pause = min(2 * self._pause, seconds)
        self._returned = time.monotonic()


def become_supernode(command: Sequence[str]) -> None:
    """Run ``command`` (``flower-supernode …``) in this process, polling as :class:`BriskClock` says.

    Flower's SuperNode is run through its own entry point with the same argv; only the module
    ``time`` of its message loop is the :class:`BriskClock`. Any other command, or a Flower whose
    loop no longer uses ``time`` that way, is ``exec``'d unchanged (Flower's 3 s then apply).
    """
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_S))
    if Path(command[0]).name == "flower-supernode":
        from flwr.supernode import start_client_internal as loop
        from flwr.supernode.cli import flower_supernode

        if getattr(loop, "time", None) is time:  # the loop calls time.sleep(3) through this name
            setattr(loop, "time", BriskClock())  # noqa: B010 (a module attribute flwr does not export)
            sys.argv = [command[0], *command[1:]]
            flower_supernode()
            sys.exit(0)
        print("medsynth: this Flower's SuperNode loop is not the expected one; it polls at its own pace",
              file=sys.stderr, flush=True)
    os.execvp(command[0], list(command))


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


# ---------------------------------------------------------------------------------------------
# the wrapper: the `flwr-clientapp` on the SuperNode's PATH


def _hand_over(conn: socket.socket, argv: Sequence[str]) -> int:
    """Ask the fork server on ``conn`` to run ``argv``; returns the ClientApp's exit status."""
    request = Request(argv=list(argv), env=dict(os.environ), cwd=os.getcwd())
    socket.send_fds(conn, [request.to_bytes()], [0, 1, 2])
    child = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    buffer = b""
    while True:
        chunk = conn.recv(256)
        if not chunk:
            raise ForkServerError("the fork server closed the connection before the ClientApp exited")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            word, value = line.decode().split(" ", 1)
            if word == "pid":
                child = int(value)
            elif word == "exit":
                code = int(value)
                return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def wrapper_main() -> None:
    """Entry point of the ``flwr-clientapp`` wrapper: hand over to the fork server, else run here.

    Only a fork server that cannot be reached makes the wrapper run the ClientApp itself; once
    the request is sent, a failure is the message's failure (exit 1), never a second run.
    """
    argv = ["flwr-clientapp", *sys.argv[1:]]
    path = os.environ.get(SOCKET_ENV, "")
    if path:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError as exc:
            conn.close()
            print(f"medsynth: the ClientApp fork server at {path} is not reachable ({exc}); starting the "
                  "ClientApp in this process", file=sys.stderr, flush=True)
        else:
            with conn:
                try:
                    code = _hand_over(conn, argv)
                except (OSError, ValueError, ForkServerError) as exc:
                    sys.exit(f"medsynth: the ClientApp fork server failed: {exc}")
            sys.exit(code)
    run_clientapp(argv)


def write_wrapper(bin_dir: Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` running :func:`wrapper_main` with this interpreter.

    The wrapper loads this file under another module name and never imports the ``client``
    package: the app bundle's own ``client`` package must be the one Flower imports next.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    path.write_text(
        f"#!{sys.executable}\n"
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('medsynth_forkserver', {str(Path(__file__).resolve())!r})\n"
        "forkserver = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(forkserver)\n"
        "forkserver.wrapper_main()\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


def wrapper_first_on_path(environ: dict[str, str], bin_dir: Path) -> None:
    """Write our ``flwr-clientapp`` into ``bin_dir`` and put it first on ``environ``'s ``PATH``."""
    wrapper = write_wrapper(bin_dir)
    environ["PATH"] = os.pathsep.join([str(wrapper.parent), environ.get("PATH", "")])


def launcher_command(command: Sequence[str]) -> list[str]:
    """``command`` (a ``flower-supernode`` command line) started through :func:`launch_supernode`."""
    return [sys.executable, str(Path(__file__).resolve()), "--", *command]


if __name__ == "__main__":  # python forkserver.py -- flower-supernode …
    if sys.argv[1:2] != ["--"] or len(sys.argv) < 3:
        sys.exit("usage: forkserver.py -- COMMAND [ARG …]")
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # this folder's modules (app.py, task.py …) must not be importable as top-level names
    launch_supernode(sys.argv[2:])
