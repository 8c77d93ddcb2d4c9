"""A local Flower *Deployment Engine* on loopback: one real SuperLink plus N real SuperNodes.

Why this module exists
----------------------
The Simulation Engine (``simulation.superlink``) runs every ClientApp inside one Ray cluster
and gives nodes only ``partition-id``. A hospital in production runs ``flower-supernode`` with
its own ``--node-config`` (data path, state path, ε budget, signing key, roster), and every
message it receives starts a fresh ``flwr-clientapp`` process. :class:`LocalDeployment` runs
exactly that on one machine, so tests and benchmarks exercise the deployment path: a
``flower-superlink`` without ``--simulation`` on a free loopback port with its own
``FLWR_HOME`` (and optional ``--database``), and one ``flower-supernode`` per site, each with
its own ``FLWR_HOME`` subfolder, its own free Runtime API ``--port`` and its own node config.
Runs are submitted with :func:`common.flower.run_app` (``num_supernodes=None``).

Process tree (flwr 1.41.0, Linux), and how it is cleaned up
------------------------------------------------------------
::

    flower-superlink                 session S0 (start_new_session), tag T
      └ flower-superexec             its own session (the SuperLink uses start_new_session)
          └ flwr-serverapp           one per run
    flower-supernode  (site k)       session Sk (start_new_session), tag T-node<k>
      └ flower-superexec             same process group as its SuperNode
          └ flwr-clientapp           one per *message*, same process group
      └ ClientApp fork server        (fork_server=True) same process group; forks one
                                     ClientApp per message for our flwr-clientapp wrapper
    flwr run / log / ls / supernode  short-lived CLI calls (run_app), tag T

Every process inherits the environment tag ``MEDSYNTH_SUPERLINK_TAG`` from the process we
started, so :func:`common.flower.find_tagged_pids` finds all of them, whatever session
or process group Flower put them in. The SuperLink side carries the deployment's tag ``T``;
each SuperNode carries its own tag ``T-node<k>`` so that :meth:`LocalDeployment.kill_node`
can SIGKILL exactly one site's processes (for crash tests). :meth:`LocalDeployment.stop`
SIGTERMs the SuperNodes' process groups first (a SuperNode whose SuperLink is gone retries
forever), then the SuperLink's; then SIGTERM, and after ``stop_grace_s`` SIGKILL, to every
tagged process left (:func:`common.flower.terminate_then_kill`); and raises
:class:`DeploymentError` if any survives.

Readiness signal
----------------
A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink has registered and activated it.
Start-up waits until (1) the SuperLink answers ``GET /health`` with 200, (2) every SuperNode
has logged its node id, and (3) ``flwr supernode list --format json`` (the SuperLink's own
Control API view) lists each of those ids with ``status == "online"``. Matching ids, rather
than counting online nodes, keeps stale nodes of a reused ``--database`` from counting.

Command lines
-------------
Both daemons' command lines come from :func:`common.flower.superlink_command` and
:func:`common.flower.supernode_command`, the same builders the production daemons use; here
without TLS or node authentication (plain HTTP on loopback).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from client.fab_gate import ANY_APP_ENV
from client.forkserver import launcher_command, wrapper_first_on_path
from common.flower import (
    FlowerEnv,
    NodeConfig,
    NotHealthy,
    RunConfigValue,
    SuperLinkError,
    describe_pids,
    executable,
    find_tagged_pids,
    flwr_json,
    free_port,
    kill_now,
    spawn,
    superlink_command,
    supernode_command,
    tail,
    terminate_then_kill,
    wait_healthy,
)

__all__ = ["DeploymentError", "LocalDeployment", "ReceivedMessage"]

_SITE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RUN_HEADER_RE = re.compile(r"\[RUN (\d+)(?:, ROUND ([^\]]*))?\]")
_RECEIVING_RE = re.compile(r"Receiving: (\S+) message")
_BIND_ERROR = "address already in use"


class DeploymentError(SuperLinkError):
    """A SuperNode or the deployment SuperLink did not start, connect, or stop; the message says where to look."""


@dataclass(frozen=True)
class ReceivedMessage:
    """One message a SuperNode pulled from the SuperLink, as its log records it.

    Attributes
    ----------
    run_id : int
        The Flower run the message belongs to.
    group : str
        The message's ``group_id`` (medsynth: the round number, or ``setup-N`` for a
        secure-aggregation session setup); empty if it had none.
    message_type : str
        E.g. ``train`` or ``train.secagg_unmask``.
    """

    run_id: int
    group: str
    message_type: str


@dataclass
class _Node:
    """Book-keeping for one SuperNode (mutable: restarted on a port clash, killed in crash tests)."""

    site: str
    config: dict[str, RunConfigValue]
    env: FlowerEnv  # FLWR_HOME = this node's folder; tag = this node's own tag
    log_path: Path
    runtime_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    node_id: int | None = None
    killed: bool = False


class LocalDeployment:
    """A private Deployment Engine (SuperLink + one SuperNode per site) for a ``with`` block.

    On enter: starts ``flower-superlink`` (no ``--simulation``) on a free loopback port with
    ``FLWR_HOME = flwr_home`` (log: ``flwr_home/superlink.log``), waits for ``/health``,
    writes the ``flwr`` connection into ``flwr_home/config.toml``, starts one
    ``flower-supernode`` per site (``FLWR_HOME = flwr_home/supernodes/<site>``, log
    ``supernode.log`` there, its own free ``--port``, ``--node-config`` from ``nodes[site]``)
    and waits until the SuperLink lists every one of them online (see module docstring).
    Then ``run_app(app_dir, deployment, run_config=..., log_path=..., timeout_s=...)`` submits
    a run. On exit: stops every process it started and verifies that none is left.

    Parameters
    ----------
    flwr_home : Path
        The SuperLink's private Flower home; created if missing. Must not lie inside the app
        folder being run unless git ignores it (``flwr run`` packs the app folder).
    nodes : Mapping[str, NodeConfig]
        Site name (``[A-Za-z0-9_-]+``, used as the node's folder name) → its node config,
        e.g. ``{"site-0": {"data-dir": "/data/site-0", "epsilon-budget": 10.0}}``.
    port : int | None
        Fixed SuperLink port, or ``None`` for a free one (retried on a bind race).
    database : Path | None
        SQLite file for the SuperLink's state (``--database``), or ``None`` for in-memory.
    startup_timeout_s : float
        Budget for the SuperLink to become healthy and, separately, for all nodes to be online.
    stop_grace_s : float
        Time between SIGTERM and SIGKILL on exit.
    fork_server : bool
        Start each SuperNode as ``medsynth node start`` does, with the ClientApp fork server
        (:mod:`client.forkserver`; each message still gets a fresh process, forked from one that
        has the libraries imported). ``False`` runs Flower's plain ``flwr-clientapp``, one
        interpreter per message (``make bench-secagg`` times both).
    """

    _START_ATTEMPTS = 3

    def __init__(
        self,
        flwr_home: Path,
        nodes: Mapping[str, NodeConfig],
        *,
        port: int | None = None,
        database: Path | None = None,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 15.0,
        fork_server: bool = True,
    ) -> None:
        if not sys.platform.startswith("linux"):
            raise DeploymentError("LocalDeployment needs Linux (/proc is used to find processes).")
        if not nodes:
            raise ValueError("LocalDeployment needs at least one node (site name → node config).")
        for site in nodes:
            if not _SITE_RE.match(site):
                raise ValueError(f"Site name {site!r} must match [A-Za-z0-9_-]+ (it names the node's FLWR_HOME).")
        if startup_timeout_s <= 0 or stop_grace_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and stop_grace_s >= 0.")
        self._flwr_home = Path(flwr_home).absolute()
        self._log_path = self._flwr_home / "superlink.log"
        self._nodes_spec = {site: dict(cfg) for site, cfg in nodes.items()}
        self._fixed_port = port
        self._database = None if database is None else Path(database).absolute()
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._fork_server = fork_server
        self._tag = uuid.uuid4().hex
        self._proc: subprocess.Popen[bytes] | None = None
        self._env: FlowerEnv | None = None
        self._nodes: dict[str, _Node] = {}

    # ------------------------------------------------------------------ properties
    @property
    def flwr_home(self) -> Path:
        """The SuperLink's ``FLWR_HOME`` (``config.toml``, installed apps, ``superlink.log``)."""
        return self._flwr_home

    @property
    def log_path(self) -> Path:
        """The SuperLink's log (stdout and stderr)."""
        return self._log_path

    @property
    def env(self) -> FlowerEnv:
        """The SuperLink's :class:`FlowerEnv`: connection name, address, ``flwr`` CLI environment."""
        if self._env is None:
            raise DeploymentError("LocalDeployment is not started; use it in a `with` block.")
        return self._env

    @property
    def pid(self) -> int:
        """PID (and process group id) of the ``flower-superlink`` process."""
        if self._proc is None:
            raise DeploymentError("LocalDeployment is not started; use it in a `with` block.")
        return self._proc.pid

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names, in the order given."""
        return tuple(self._nodes_spec)

    @property
    def node_ids(self) -> dict[str, int]:
        """Site → Flower node id (as ``Message.metadata.src_node_id`` shows it), once online."""
        return {site: node.node_id for site, node in self._nodes.items() if node.node_id is not None}

    @property
    def tags(self) -> tuple[str, ...]:
        """Every process tag in use: the SuperLink side's first, then one per SuperNode."""
        return (self._tag, *(self._node_tag(i) for i in range(len(self._nodes_spec))))

    def node_log(self, site: str) -> Path:
        """Path of a SuperNode's log (its ClientApps' output goes there too)."""
        return self._node(site).log_path

    def node_pid(self, site: str) -> int:
        """PID (and process group id) of a site's ``flower-supernode`` process."""
        proc = self._node(site).proc
        if proc is None:
            raise DeploymentError(f"SuperNode {site!r} is not running.")
        return proc.pid

    def node_pids(self, site: str) -> set[int]:
        """Live processes of one site: its SuperNode, SuperExec and ClientApps."""
        return find_tagged_pids(self._node(site).env.tag)

    def owned_pids(self) -> set[int]:
        """Live processes started by this deployment (SuperLink side, every SuperNode, ``flwr`` calls)."""
        found: set[int] = set()
        for tag in self.tags:
            found |= find_tagged_pids(tag)
        return found

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalDeployment:
        """Start the SuperLink and the SuperNodes; return once every node is online."""
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
        """Start the SuperLink, then the SuperNodes, and wait until all nodes are online."""
        if self._proc is not None:
            raise DeploymentError("LocalDeployment already started.")
        for name in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            executable(name)
        self._flwr_home.mkdir(parents=True, exist_ok=True)
        try:
            self._start_superlink()
            for index, (site, config) in enumerate(self._nodes_spec.items()):
                node_home = self._flwr_home / "supernodes" / site
                node = _Node(
                    site=site,
                    config=config,
                    env=FlowerEnv(
                        flwr_home=node_home,
                        port=self.env.port,
                        host=self.env.host,
                        connection=self.env.connection,
                        tag=self._node_tag(index),
                    ),
                    log_path=node_home / "supernode.log",
                )
                self._nodes[site] = node
                self._start_node(node)
            self._wait_nodes_online()
        except BaseException:
            self.stop(raise_on_leftovers=False)
            raise

    def stop(self, *, raise_on_leftovers: bool = True) -> None:
        """Stop every SuperNode and the SuperLink, then every tagged leftover; verify none is left.

        Order: SIGTERM each SuperNode's process group (SuperNode, SuperExec, ClientApps) and
        the SuperLink's; wait up to ``stop_grace_s``; SIGTERM every remaining tagged process
        (the SuperLink's SuperExec and ServerApp live in another session), wait; SIGKILL the
        rest; reap our children. Raises :class:`DeploymentError` listing survivors.
        """
        procs = [n.proc for n in self._nodes.values()] + [self._proc]
        remaining = terminate_then_kill(procs, self.tags, grace_s=self._stop_grace_s)
        self._proc = None
        for node in self._nodes.values():
            node.proc = None
        if raise_on_leftovers and remaining:
            raise DeploymentError(
                "Processes started by LocalDeployment survived SIGKILL (uninterruptible I/O?). "
                f"Inspect with `ps -o pid,stat,cmd -p PID`:\n{describe_pids(remaining)}"
            )

    # ------------------------------------------------------------------ crash tests and inspection
    def kill_node(self, site: str) -> set[int]:
        """SIGKILL one site's SuperNode, its SuperExec and any running ClientApp (a crash).

        The SuperLink notices only through missed heartbeats (about a minute in flwr 1.41);
        until then it still lists the node online. Returns the PIDs that were killed; raises
        :class:`DeploymentError` if one of them survives.
        """
        node = self._node(site)
        pids = find_tagged_pids(node.env.tag)
        left = kill_now([node.proc], [node.env.tag])
        node.killed = True
        if left:
            raise DeploymentError(f"SuperNode {site!r}: processes survived SIGKILL:\n{describe_pids(left)}")
        return pids

    def list_nodes(self, timeout_s: float = 30.0) -> dict[int, str]:
        """The SuperLink's view (``flwr supernode list``): node id → status (``online``, ``offline``, ...)."""
        data = flwr_json(["supernode", "list", self.env.connection], self, timeout_s)
        nodes = data.get("nodes") or []
        return {int(n["node-id"]): str(n.get("status", "unknown")) for n in nodes}

    def received_messages(self, site: str, run_id: int | None = None) -> list[ReceivedMessage]:
        """Messages a site's SuperNode pulled, in order (parsed from its log), optionally for one run.

        flwr 1.41 logs ``[RUN r, ROUND g]`` then ``Receiving: <type> message (ID: ...)`` for each.
        """
        try:
            text = self._node(site).log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise DeploymentError(f"Cannot read the log of SuperNode {site!r}: {err}") from err
        found: list[ReceivedMessage] = []
        header: tuple[int, str] | None = None
        for raw in text.splitlines():
            line = _ANSI_RE.sub("", raw)
            if match := _RUN_HEADER_RE.search(line):
                header = (int(match.group(1)), match.group(2) or "")
            elif (match := _RECEIVING_RE.search(line)) and header is not None:
                if run_id is None or header[0] == run_id:
                    found.append(ReceivedMessage(header[0], header[1], match.group(1)))
                header = None
        return found

    # ------------------------------------------------------------------ internals
    def _node_tag(self, index: int) -> str:
        return f"{self._tag}-node{index}"

    def _node(self, site: str) -> _Node:
        if site not in self._nodes_spec:
            raise KeyError(f"Unknown site {site!r}; this deployment has {list(self._nodes_spec)}.")
        if site not in self._nodes:
            raise DeploymentError("LocalDeployment is not started; use it in a `with` block.")
        return self._nodes[site]

    def _start_superlink(self) -> None:
        """Start ``flower-superlink`` (Deployment Engine, plain HTTP) and wait for ``/health``."""
        last_tail = ""
        for _ in range(1 if self._fixed_port is not None else self._START_ATTEMPTS):
            port = self._fixed_port if self._fixed_port is not None else free_port()
            env = FlowerEnv(flwr_home=self._flwr_home, port=port, connection="medsynth-deployment", tag=self._tag)
            cmd = superlink_command(host=env.host, port=port, database=self._database)
            self._proc = spawn(cmd, env.environ(), self._log_path, cwd=self._flwr_home)
            self._env = env
            try:
                wait_healthy(self._proc, env, log_path=self._log_path, timeout_s=self._startup_timeout_s)
            except NotHealthy as exc:
                last_tail = exc.log_tail
                self.stop(raise_on_leftovers=False)
                self._env = None
                if self._fixed_port is not None or _BIND_ERROR not in last_tail.lower():
                    break
                continue
            env.write_config()
            return
        raise DeploymentError(
            f"flower-superlink did not become healthy within {self._startup_timeout_s:.0f} s. "
            f"Check {self._log_path}. Last lines:\n{last_tail}"
        )

    def _start_node(self, node: _Node) -> None:
        """(Re)start one SuperNode on a fresh free Runtime API port."""
        node.env.flwr_home.mkdir(parents=True, exist_ok=True)
        node.runtime_port = free_port(self.env.host)
        node.node_id = None
        cmd = supernode_command(
            superlink=self.env.address,
            runtime_port=node.runtime_port,
            node_config=node.config,
            node_config_file=node.env.flwr_home / "node-config.toml",
        )
        environ = node.env.environ()
        if self._fork_server:  # as client.daemon does it; these nodes run any app they are sent
            wrapper_first_on_path(environ, node.env.flwr_home / "bin")
            environ[ANY_APP_ENV] = "1"
            cmd = launcher_command(cmd)
        node.proc = spawn(cmd, environ, node.log_path, cwd=node.env.flwr_home)

    def _wait_nodes_online(self) -> None:
        """Wait until the SuperLink lists every SuperNode's id online (see module docstring)."""
        deadline = time.monotonic() + self._startup_timeout_s
        restarts = dict.fromkeys(self._nodes, 0)
        statuses: dict[int, str] = {}
        while True:
            for node in self._nodes.values():
                if node.proc is None:
                    raise DeploymentError(f"SuperNode {node.site!r} was not started.")
                if node.proc.poll() is not None:
                    log_tail = tail(node.log_path)
                    if _BIND_ERROR in log_tail.lower() and restarts[node.site] < self._START_ATTEMPTS:
                        restarts[node.site] += 1  # lost the race for its free port: new port
                        self._start_node(node)
                        continue
                    raise DeploymentError(
                        f"SuperNode {node.site!r} exited with code {node.proc.returncode} before "
                        f"connecting. Check {node.log_path}. Last lines:\n{log_tail}"
                    )
                if node.node_id is None:
                    with contextlib.suppress(OSError):
                        text = node.log_path.read_text(encoding="utf-8", errors="replace")
                        if match := _NODE_ID_RE.search(text):
                            node.node_id = int(match.group(1))
            ids = [n.node_id for n in self._nodes.values()]
            if all(i is not None for i in ids):
                statuses = self.list_nodes(timeout_s=max(deadline - time.monotonic(), 5.0))
                if all(statuses.get(i) == "online" for i in ids if i is not None):
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        lines = []
        for node in self._nodes.values():
            status = "no node id logged yet" if node.node_id is None else statuses.get(node.node_id, "not listed")
            lines.append(f"  {node.site}: {status} (log {node.log_path})")
        raise DeploymentError(
            f"Not every SuperNode was online at the SuperLink within {self._startup_timeout_s:.0f} s:\n"
            + "\n".join(lines)
            + f"\nSuperLink log: {self._log_path}"
        )
