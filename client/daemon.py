"""``medsynth node start``: the hospital daemon around ``flower-supernode``.

In order:

1. ``node.toml`` is validated (:class:`client.node_config.NodeDeployConfig`): data folder,
   CA certificate, both private keys (mode 0600), the roster entry of this site; the Runtime
   API's port (``[node] runtime-port``) must be free, else the daemon stops at once with exit
   status 2 naming the port and the key (two hospitals' nodes on one host need two ports);
2. the privacy position is printed: budget, spent, left, and the caps of ``node.toml``;
3. a TLS handshake with the SuperLink checks its certificate against the configured CA
   (a wrong CA or host name fails here, with a message saying so; an unreachable server is
   not an error: the node waits for it);
4. the local dataset is prepared if the cache is missing or stale (``client.prepare.pipeline``);
5. ``flower-supernode`` runs with ``--root-certificates``, ``--auth-supernode-private-key``
   and the node config; its Runtime API listens on loopback only, and it only ever dials
   out. Its ``flwr-clientapp`` is ours: each message's ClientApp is forked from a process that has
   the libraries imported (``client.forkserver``) and passes the app allow-list (``client.fab_gate``).

While it runs the daemon says what the node does (``client.status.NodeWatcher``): one line per
round (trained / declined / refused, ε after, σ) from the audit log, a line when a run begins,
and the app allow-list's verdicts. The SuperNode's output goes to ``STATE/logs/supernode-<UTC
start time>.log``, one file per ``medsynth node start`` (nothing is overwritten);
``STATE/daemon.json`` names the processes, the port and that log (``medsynth node status``).

Supervision: the SuperNode itself retries a lost connection for ever; if it exits, the daemon
restarts it with exponential back-off (network loss, a restarted server), except when the
SuperLink refused this node's key or certificate: that needs a person, so the daemon exits
with status 2 and says what to do. SIGTERM stops the SuperNode and its ClientApps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from types import FrameType

from client.fab_gate import ALLOWLIST_ENV, ANY_APP_ENV
from client.forkserver import launcher_command, wrapper_first_on_path
from client.node_config import NodeDeployConfig
from client.prepare.pipeline import PrepareReport, load_or_create_salt, prepare_site
from client.status import DAEMON_FILE, NodeWatcher, privacy_lines, start_log_path
from common.atomic import write_json_atomic
from common.config import ConfigError, parse_class_names
from common.flower import FlowerEnv, spawn, supernode_command, tail, terminate_then_kill

MAX_BACKOFF_S = 60.0
#: Seconds between SIGTERM and SIGKILL when the SuperNode and its ClientApps are stopped.
STOP_GRACE_S = 15.0


#: Seconds between two looks at the audit log and the SuperNode's log while it runs.
WATCH_INTERVAL_S = 1.0


class NodeRejected(ConfigError):
    """The SuperLink refused this node (unregistered key, untrusted certificate); a person must act."""


class RuntimePortInUse(ConfigError):
    """``[node] runtime-port`` is taken on this machine; the SuperNode could not serve its ClientApps."""


def port_in_use_message(port: int) -> str:
    return (f"[node] runtime-port = {port} is already in use on this machine (another hospital's node or another "
            "program listens on 127.0.0.1:" + str(port) + "); set [node] runtime-port in node.toml to a free port")


def check_runtime_port(port: int) -> None:
    """``RuntimePortInUse`` unless 127.0.0.1:``port`` can be bound, as the SuperNode's Runtime API will.

    ``SO_REUSEADDR`` as uvicorn sets it: a port left in TIME_WAIT by the previous start is free,
    one a process listens on is not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise RuntimePortInUse(port_in_use_message(port)) from exc


def check_superlink_certificate(cfg: NodeDeployConfig, timeout_s: float = 10.0) -> bool:
    """TLS handshake against the configured CA and host name.

    Returns True when verified, False when the server is unreachable (the node will keep
    trying); raises :class:`NodeRejected` when it answers with a certificate the CA does not vouch for.
    """
    context = ssl.create_default_context(cafile=str(cfg.ca_certificate))
    try:
        with socket.create_connection((cfg.superlink_host, cfg.superlink_port), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=cfg.superlink_host):
            return True
    except ssl.SSLCertVerificationError as exc:
        raise NodeRejected(
            f"the server at {cfg.superlink} presented a certificate that {cfg.ca_certificate} does not vouch for "
            f"({exc.verify_message}); check [tls] ca-certificate (the consortium's ca.pem) and [node] superlink"
        ) from exc
    except ssl.SSLError as exc:
        raise NodeRejected(f"TLS with {cfg.superlink} failed ({exc}); is this the SuperLink's TLS port?") from exc
    except OSError:
        return False


def diagnose_exit(log_text: str, site_id: str = "site", runtime_port: int = 0) -> str | None:
    """A person-actionable reason for a SuperNode exit, or None for a transient one (retry)."""
    if "Failed to activate SuperNode" in log_text:
        return ("the SuperLink refused this hospital's authentication key: it is not registered. Send "
                f"{site_id}.auth.pub to the consortium operator (server.toml [hospitals]) and start again")
    if "Runtime HTTP API failed to start" in log_text:  # taken between the check at start and the bind
        return port_in_use_message(runtime_port)
    if "CERTIFICATE_VERIFY_FAILED" in log_text:
        return "the SuperLink's certificate does not verify against [tls] ca-certificate"
    if "Unable to parse the private key file" in log_text:
        return "flower-supernode cannot parse [keys] auth-private-key"
    return None


class NodeDaemon:
    """Supervises one hospital's ``flower-supernode``."""

    def __init__(self, cfg: NodeDeployConfig, say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.say = say
        self.tag = uuid.uuid4().hex
        self.runtime_port = cfg.runtime_port
        self.started = time.time()
        self.log_path = start_log_path(cfg.state_dir, self.started)  # one file per `node start`
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.last_output = ""

    def supernode_command(self) -> list[str]:
        """The exact command line (``deploy/`` files mirror it)."""
        c = self.cfg
        return supernode_command(
            superlink=c.superlink,
            runtime_port=self.runtime_port,
            node_config=c.flower_node_config(),
            node_config_file=c.state_dir / "node-config.toml",
            root_certificates=c.ca_certificate,
            auth_private_key=c.auth_private_key,
        )

    def environ(self) -> dict[str, str]:
        """The SuperNode's environment: its own ``FLWR_HOME`` and tag, and our ``flwr-clientapp``
        (fork server hand-over and app allow-list, :mod:`client.forkserver`) first on ``PATH``."""
        env = FlowerEnv(flwr_home=self.cfg.state_dir / "flwr-home", port=self.cfg.superlink_port,
                        tag=self.tag).environ()
        wrapper_first_on_path(env, self.cfg.state_dir / "bin")
        if self.cfg.allowed_fabs:
            env[ALLOWLIST_ENV] = ",".join(self.cfg.allowed_fabs)
        elif self.cfg.any_app_may_run:  # NodeDeployConfig.check_apps refuses an empty list without it
            env[ANY_APP_ENV] = "1"
        return env

    def prepare(self) -> PrepareReport:
        """Build (or reuse) the training cache so the first round does not pay for it."""
        return prepare_site(
            self.cfg.data_dir, self.cfg.cache_dir, image_size=self.cfg.image_size,
            salt=load_or_create_salt(self.cfg.salt_path),
            class_names=parse_class_names(self.cfg.class_names) if self.cfg.class_names else None,
            progress=True,
            denoise=self.cfg.denoise,
        )

    def run_once(self) -> int:
        """Run the SuperNode until it exits; returns its exit code."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.state_dir / "flwr-home").mkdir(exist_ok=True)
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = spawn(launcher_command(self.supernode_command()), self.environ(), self.log_path,
                          cwd=self.cfg.state_dir, append=True)
        write_json_atomic(self.cfg.state_dir / DAEMON_FILE,
                          {"pid": os.getpid(), "supernode_pid": self.proc.pid, "tag": self.tag,
                           "runtime_port": self.runtime_port, "log": str(self.log_path), "started": self.started})
        self.say(f"node {self.cfg.site_id}: SuperNode started (pid {self.proc.pid}), dialing {self.cfg.superlink}; "
                 f"log {self.log_path}")
        watcher = NodeWatcher(self.cfg, self.say, self.log_path)
        while True:
            try:
                code = self.proc.wait(timeout=WATCH_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                watcher.poll()
        watcher.poll()
        terminate_then_kill([], [self.tag], grace_s=STOP_GRACE_S)  # ClientApps it left behind
        with self.log_path.open("rb") as fh:
            fh.seek(start)
            self.last_output = fh.read().decode(errors="replace")
        return code

    def supervise(self) -> None:
        """Restart the SuperNode with back-off until stopped or rejected."""
        backoff = 1.0
        while not self.stopping:
            started = time.monotonic()
            code = self.run_once()
            if self.stopping:
                return
            reason = diagnose_exit(self.last_output, self.cfg.site_id, self.runtime_port)
            if reason is not None:
                raise NodeRejected(f"node {self.cfg.site_id}: {reason} (log: {self.log_path})")
            if time.monotonic() - started > 300:
                backoff = 1.0
            self.say(f"node {self.cfg.site_id}: SuperNode exited with code {code}; restarting in {backoff:.0f} s. "
                     f"Last lines:\n{tail(self.log_path, 5)}")
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def stop(self) -> None:
        """Stop the SuperNode, its SuperExec and ClientApps: SIGTERM, SIGKILL after a grace period."""
        self.stopping = True
        terminate_then_kill([self.proc], [self.tag], grace_s=STOP_GRACE_S)


def start_node(cfg: NodeDeployConfig, say: Callable[[str], None] = print) -> None:
    """``medsynth node start``: checks, prepares, then supervises the SuperNode until SIGTERM."""
    cfg.check_apps()  # also for a config built without NodeDeployConfig.load
    check_runtime_port(cfg.runtime_port)  # fail now, not in a restart loop of the SuperNode
    for line in privacy_lines(cfg):  # a rolled-back or missing ledger stops here (exit 2)
        say(f"node {cfg.site_id}: {line}")
    if check_superlink_certificate(cfg):
        say(f"node {cfg.site_id}: the server at {cfg.superlink} presents a certificate signed by your CA")
    else:
        say(f"node {cfg.site_id}: the server at {cfg.superlink} is not reachable yet; the node will keep trying")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    daemon = NodeDaemon(cfg, say)
    report = daemon.prepare()
    say(report.format())
    if not cfg.allowed_fabs:
        say(f"node {cfg.site_id}: WARNING: [apps] any-app-may-run = true and allowed-fab-sha256 is empty: this "
            "node runs any app the server sends; list the agreed app's hash (`medsynth server fab-hash`)")

    def on_term(signum: int, frame: FrameType | None) -> None:
        daemon.stopping = True
        if daemon.proc is not None and daemon.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(daemon.proc.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        daemon.supervise()
    finally:
        daemon.stop()
        signal.signal(signal.SIGTERM, previous)
