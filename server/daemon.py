"""``medsynth server start|status``: the consortium's SuperLink with TLS, node authentication and
SQLite state, running (or resuming) the training run.

``start`` does, in order:

1. validates ``server.toml`` (:class:`server.server_config.ServerDeployConfig`);
2. starts ``flower-superlink`` with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``,
   ``--enable-supernode-auth`` and ``--database STATE/state.db``, runtime dependency
   installation off, and waits for ``GET /health`` over TLS;
3. registers every hospital's authentication public key (``flwr supernode register``; a
   key already registered in the database is fine);
4. submits the run (``flwr run`` with ``output-dir = STATE/results``) and prints its log:
   one line per round with who trained and each hospital's cumulative ε. The ServerApp
   resumes from the last checkpoint that verifies, so a restart after a crash continues the
   round numbering and loses no completed round;
5. stops the SuperLink when the run is finished.

Exit status (``common.errors``), what a service manager does next:

* 0: the run has finished (also when ``start`` finds it finished already: it says so, with the
  round and where the results are, and starts nothing);
* 1, restartable: the SuperLink died (killed, out of memory), the ServerApp died, or it stopped
  for a reason a restart can cure (hospitals that did not join within ``wait-nodes-timeout``, a
  secure round short of hospitals). The daemon stops what is left (the ServerApp included) and
  says in one line that the next start resumes; systemd ``Restart=on-failure`` and compose
  ``restart: on-failure`` start it again;
* 2: a person must fix something first (``server.toml``, a certificate, the port in use, a
  corrupt state file, the run's time limit); the units do not restart on it.

Why the ServerApp stopped comes from ``STATE/results/last_error.json`` (``server.outcome``), not
from Flower's traceback: the console shows the run's own lines and the one line of the error;
the run log keeps everything. Logs are kept per start (``STATE/logs/superlink-<time>.log``,
``run-<time>.log``, the last :data:`LOGS_KEPT` of each), ``STATE/superlink.log`` and
``STATE/run.log`` link to the newest. ``STATE/daemon.json`` names the running processes (PIDs
and the process tag); ``STATE/results/hospitals.json`` which Flower node id is which hospital.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from common import round_record
from common.atomic import write_json_atomic
from common.config import ConfigError
from common.errors import EXIT_RESTARTABLE, UserError
from common.flower import (
    CertificateNotTrusted,
    DaemonExited,
    FlowerEnv,
    NotHealthy,
    RunFailedError,
    ServerTls,
    SuperLinkError,
    flwr_json,
    run_app,
    sigterm_raises_interrupt,
    spawn,
    superlink_command,
    terminate_then_kill,
    wait_healthy,
)
from common.round_record import ServerState, SitePrivacyReport
from server.outcome import LAST_ERROR_FILE, ServerAppError
from server.registry import HOSPITALS_FILE, NodeRegistry
from server.server_config import ServerDeployConfig, app_defaults

STARTUP_TIMEOUT_S = 60.0
#: Seconds between SIGTERM and SIGKILL when the SuperLink and its ServerApp are stopped.
STOP_GRACE_S = 15.0
#: Log files kept per kind (superlink, run): one per start, the oldest removed first.
LOGS_KEPT = 10
#: Where the server records, per round, the digest of every message a hospital sent.
DIGESTS_WHERE = "rounds[].costs.<site>.received[].sha256 and final_model.received.<site>.sha256"


class ServerCrashed(UserError, RuntimeError):
    """The SuperLink or the ServerApp died (killed, out of memory, a bug); a restart resumes from
    the last completed round's checkpoint, so the service manager starts it again."""

    exit_code = EXIT_RESTARTABLE


class RunStopped(UserError, RuntimeError):
    """The ServerApp stopped for a reason a restart can cure (hospitals not there in time, a
    secure round short of hospitals); the next start waits and resumes."""

    exit_code = EXIT_RESTARTABLE


class RunNeedsAttention(UserError, RuntimeError):
    """The run stopped for a reason a person must look at first (a configuration or state the
    ServerApp refused, its time limit, a `flwr stop`); the service manager does not restart it."""


class PortInUse(SuperLinkError):
    """The SuperLink's port is taken by another program: change ``[superlink] port`` or stop it."""


def planned_rounds(cfg: ServerDeployConfig) -> int:
    """``num-server-rounds`` of the run ``cfg`` submits (its ``[run]`` override, else the app's default)."""
    return int({**app_defaults(cfg.app_dir), **cfg.run_overrides}["num-server-rounds"])


def finished_already(state: ServerState | None, total: int) -> bool:
    """Whether the recorded run has nothing left to do: it finished all ``total`` rounds, or it
    stopped early because no hospital could train (a restart would find the same budgets)."""
    if state is None or not state.finished:
        return False
    return state.stopped_early is not None or (bool(state.rounds) and state.rounds[-1].round >= total)


def log_for_this_start(state_dir: Path, kind: str, stamp: str) -> Path:
    """``STATE/logs/<kind>-<stamp>.log`` for this start, ``STATE/<kind>.log`` a link to it; only the
    newest :data:`LOGS_KEPT` of ``kind`` are kept (a ``<kind>.log`` file from before is moved in)."""
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link = state_dir / f"{kind}.log"
    if link.is_file() and not link.is_symlink():  # a log written before logs were kept per start
        link.rename(logs / f"{kind}-00000000-000000.log")
    path = logs / f"{kind}-{stamp}.log"
    n = 1
    while path.exists():  # two starts within one second
        path, n = logs / f"{kind}-{stamp}-{n}.log", n + 1
    path.touch()
    tmp = state_dir / f".{kind}.log.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.relative_to(state_dir))
    os.replace(tmp, link)
    earlier = sorted(p for p in logs.glob(f"{kind}-*.log") if p != path)
    for old in earlier[: max(len(earlier) - (LOGS_KEPT - 1), 0)]:  # this start's log is always kept
        old.unlink(missing_ok=True)
    return path


class ConsoleLines:
    """What of the run's log reaches the console: every line until the ServerApp's own error
    epilogue (Flower's traceback and exit-code help, which the run log keeps), without the
    boxes ``flwr log`` draws when it loses its connection; the daemon then says the error in one line."""

    EPILOGUE = "ServerApp raised an exception"

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.muted = False

    def __call__(self, line: str) -> None:
        if self.EPILOGUE in line:
            self.muted = True
        if self.muted or line.lstrip().startswith(("╭", "│", "╰")):
            return
        self.say(line)


class SuperLinkDaemon:
    """One ``medsynth server start``: owns a SuperLink process and the run it serves.

    Satisfies :class:`common.flower.FlowerConnection` (``env``, ``flwr_home``, ``log_path``),
    so the run is submitted and followed with the same :func:`common.flower.run_app` the
    simulation uses.
    """

    def __init__(self, cfg: ServerDeployConfig, say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.say = say
        self.tag = uuid.uuid4().hex
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")  # names this start's log files
        self.flwr_home = cfg.flwr_home
        self.log_path = cfg.state_dir / "superlink.log"  # a link to this start's SuperLink log
        self.env = FlowerEnv(
            flwr_home=cfg.flwr_home,
            port=cfg.port,
            host=cfg.local_host,
            connection="medsynth-server",
            tag=self.tag,
            root_certificates=cfg.ca_certificate,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- the SuperLink process
    def superlink_command(self) -> list[str]:
        """The exact command line (``deploy/`` files mirror it)."""
        c = self.cfg
        return superlink_command(host=c.host, port=c.port, database=c.database, node_auth=True,
                                 tls=ServerTls(c.ca_certificate, c.certificate, c.private_key))

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until ``/health`` answers over TLS."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        log_file = log_for_this_start(self.cfg.state_dir, "superlink", self.stamp)
        self.proc = spawn(self.superlink_command(), self.env.environ(), log_file, cwd=self.flwr_home)
        self.write_pid_file()
        try:
            wait_healthy(self.proc, self.env, log_path=self.log_path, timeout_s=STARTUP_TIMEOUT_S)
        except CertificateNotTrusted as exc:
            raise ConfigError(
                f"the SuperLink's certificate {self.cfg.certificate} does not verify for {self.env.host} against "
                f"{self.cfg.ca_certificate}; issue it with `medsynth certs server` (it names localhost and "
                "127.0.0.1 as well as your --host names)"
            ) from exc
        except DaemonExited as exc:
            if "address already in use" in exc.log_tail.lower():
                raise PortInUse(
                    f"port {self.cfg.port} on {self.cfg.host} is in use by another program; stop it or change "
                    f"[superlink] port in server.toml (see {self.log_path})"
                ) from exc
            raise ServerCrashed(
                f"flower-superlink exited with code {exc.returncode} while starting; see {self.log_path}"
            ) from exc
        except NotHealthy as exc:
            raise ServerCrashed(
                f"flower-superlink did not answer {self.env.base_url}/health within {STARTUP_TIMEOUT_S:.0f} s; "
                f"see {self.log_path}"
            ) from exc
        self.env.write_config()

    @property
    def registry_path(self) -> Path:
        return self.cfg.results_dir / HOSPITALS_FILE

    def register_hospitals(self) -> None:
        """Register each hospital's public key (keys already in the SQLite state are kept) and
        record which node id each got (``STATE/results/hospitals.json``)."""
        registry = NodeRegistry.read(self.registry_path)
        states: dict[str, object] | None = None
        for site, key in sorted(self.cfg.hospitals.items()):
            try:
                data = flwr_json(["supernode", "register", str(key), self.env.connection, "--name", site], self, 60.0)
            except SuperLinkError as exc:
                if "already in use" not in str(exc):
                    raise
                known = registry.node_ids.get(site)
                if known is not None and states is None:  # one listing for every already-registered key
                    states = self._node_states()
                self.say(already_registered_line(site, known, states or {}))
                continue
            try:
                node_id = int(data["node-id"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SuperLinkError(f"`flwr supernode register` answered without a node id: {data}") from exc
            registry = registry.with_site(site, node_id)
            self.say(f"registered hospital {site} (node {node_id})")
        registry.write(self.registry_path)

    def _node_states(self) -> dict[str, object]:
        """Node id (as text) → status, from ``flwr supernode list`` ({} when it does not answer)."""
        try:
            nodes = flwr_json(["supernode", "list", self.env.connection], self, 30.0).get("nodes")
        except SuperLinkError:
            return {}
        return {str(n.get("node-id")): n.get("status") for n in nodes or () if isinstance(n, dict)}

    def write_pid_file(self) -> None:
        write_json_atomic(self.cfg.state_dir / "daemon.json", {
            "pid": os.getpid(), "superlink_pid": self.proc.pid if self.proc else None, "tag": self.tag,
            "address": self.env.address, "started": time.time(),
        })

    def stop(self) -> None:
        """SIGTERM the SuperLink's group and every process it started (ServerApp, flwr CLI); then SIGKILL."""
        terminate_then_kill([self.proc], [self.tag], grace_s=STOP_GRACE_S)

    # ---------------------------------------------------------------- the run
    def run(self) -> ServerState | None:
        """Start, register, run to the end; returns the final server state.

        A run that has finished already starts nothing: it is said, and the state returned.
        """
        state = read_server_state(self.cfg.results_dir)
        total = planned_rounds(self.cfg)
        if state is not None and finished_already(state, total):
            self.say(describe_finished(state, total, self.cfg.results_dir))
            return state
        self.start_superlink()
        self.say(f"SuperLink up at {self.env.base_url} (TLS, node authentication, state {self.cfg.database})")
        self.register_hospitals()
        # only now can every hospital connect: a node that dials before its key is registered is
        # refused as unknown (and stops, exit 2), so operators and tests wait for this line
        self.say(f"accepting hospitals: {len(self.cfg.hospitals)} registered ({', '.join(sorted(self.cfg.hospitals))})")
        done = len(state.rounds) if state is not None else 0
        if done:
            self.say(f"resuming: {done} round(s) completed before; continuing from the last good checkpoint")
        overrides = {**self.cfg.run_overrides, "output-dir": str(self.cfg.results_dir)}
        run_log = log_for_this_start(self.cfg.state_dir, "run", self.stamp)
        try:
            run_app(self.cfg.app_dir, self, run_config=overrides, log_path=run_log,
                    timeout_s=self.cfg.run_timeout_s, on_line=ConsoleLines(self.say))
        except (RunFailedError, SuperLinkError) as exc:
            raise self.why_it_failed(exc) from exc
        return read_server_state(self.cfg.results_dir)

    def why_it_failed(self, exc: SuperLinkError) -> UserError:
        """The error a failed run is reported as, with the exit code a service manager acts on."""
        run_log = self.cfg.state_dir / "run.log"
        if self.proc is not None and self.proc.poll() is not None:
            return ServerCrashed(
                f"the SuperLink exited unexpectedly (code {self.proc.returncode}); start the server again: the run "
                f"resumes from the last completed round's checkpoint (logs: {self.log_path}, {run_log})"
            )
        if not isinstance(exc, RunFailedError):
            return exc  # a `flwr` command failed with the SuperLink up: its message says what to do
        if exc.status == "timeout":
            hours = self.cfg.run_timeout_s / 3600
            return RunNeedsAttention(
                f"the run did not finish within run-timeout-hours = {hours:g} and was stopped; raise it in "
                "server.toml [superlink] (or find why rounds are slow), then start the server again to resume"
            )
        if exc.status == "finished:stopped":
            return RunNeedsAttention("the run was stopped with `flwr stop`; start the server again to resume it")
        error = ServerAppError.read(self.cfg.results_dir / LAST_ERROR_FILE, exc.run_id)
        if error is not None:
            return (RunStopped if error.restartable else RunNeedsAttention)(error.message)
        return ServerCrashed(
            f"the ServerApp ended unexpectedly (Flower status {exc.status}); its log is {run_log}; start the server "
            "again: the run resumes from the last completed round's checkpoint"
        )


def describe_finished(state: ServerState, total: int, results: Path) -> str:
    """One line for a start that finds the run finished: how far it went and where the results are."""
    last = state.rounds[-1].round if state.rounds else 0
    how = (f"stopped early after round {last} of {total} ({state.stopped_early.reason})"
           if state.stopped_early is not None else f"finished: round {last} of {total}")
    return (f"the run has {how}; nothing to do, nothing started. Results: {results} (report.html); "
            "a new run needs another state-dir")


def read_server_state(results_dir: Path) -> ServerState | None:
    """The run's records file (None before the first round finished); a malformed one is a ConfigError."""
    try:
        return round_record.read_server_state(results_dir / round_record.RECORDS_FILE)
    except round_record.RecordError as exc:
        raise ConfigError(str(exc)) from exc


def start_server(cfg: ServerDeployConfig, say: Callable[[str], None] = print) -> ServerState | None:
    """``medsynth server start``: run the federation; the SuperLink is stopped however this ends."""
    if cfg.state_dir.resolve().is_relative_to(cfg.app_dir.resolve()):
        raise ConfigError(f"[superlink] state-dir {cfg.state_dir} lies inside the app folder {cfg.app_dir}; "
                          "`flwr run` would bundle it. Use a folder outside it.")
    daemon = SuperLinkDaemon(cfg, say)
    with sigterm_raises_interrupt():
        try:
            state = daemon.run()
        finally:
            daemon.stop()
    say(format_status(state, cfg))
    return state


def format_status(state: ServerState | None, cfg: ServerDeployConfig) -> str:
    """Rounds, who took part, each hospital's cumulative ε (budget spending is not patient data),
    who kept the final model, and where the digests a hospital compares with its audit log are."""
    rounds = state.rounds if state is not None else ()
    total = planned_rounds(cfg)
    finished = state is not None and state.finished
    lines = [f"rounds completed: {len(rounds)} of {total}" + (" (finished)" if finished else "")]
    latest: dict[str, SitePrivacyReport] = {}
    for r in rounds:
        lines.append(f"  round {r.round}: trained {', '.join(r.sites_trained) or 'nobody'}"
                     + (f"; {len(r.failures)} failure(s)" if r.failures else ""))
        latest.update(r.privacy)
    if latest:
        lines.append("privacy spent per hospital (cumulative, patient level):")
        for site, p in sorted(latest.items()):
            sigma = "" if p.noise_multiplier is None else f", last σ = {p.noise_multiplier:.3g}"
            lines.append(f"  {site}: ε = {p.epsilon:.3f} of {p.epsilon_budget:g} at δ = {p.delta:g} "
                         f"({p.steps} steps{sigma}, {p.status})")
    if state is not None and state.stopped_early is not None:
        lines.append(f"stopped early: {state.stopped_early.reason}")
    if state is not None and state.final_model is not None:
        fm = state.final_model
        lines.append(f"final model (round {fm.round}, sha256 {fm.content_sha256[:16]}…) kept by "
                     f"{', '.join(fm.kept) or 'nobody'}" + (f"; {len(fm.failures)} failure(s)" if fm.failures else ""))
    lines.append(f"results: {cfg.results_dir}")
    lines.append(f"digests of what each hospital sent: {cfg.results_dir / round_record.RECORDS_FILE} "
                 f"({DIGESTS_WHERE}); a hospital finds the same SHA-256 in `medsynth node audit`")
    return "\n".join(lines)


def hospital_lines(cfg: ServerDeployConfig, nodes: list[dict[str, str]] | None) -> list[str]:
    """Registered hospitals and, with ``nodes`` (``flwr supernode list``; None when the SuperLink is
    not running), whether each is connected now."""
    registry = NodeRegistry.read(cfg.results_dir / HOSPITALS_FILE)
    sites = sorted(set(cfg.hospitals) | set(registry.node_ids))
    if nodes is None:
        return [f"hospitals: {len(sites)} registered ({', '.join(sites)}); connections unknown: the server is "
                "not running"]
    status = {int(n["node-id"]): n for n in nodes if str(n.get("node-id", "")).isdigit()}
    rows, connected = [], 0
    for site in sites:
        node_id = registry.node_ids.get(site)
        info = status.get(node_id) if node_id is not None else None
        if info is None:
            rows.append(f"  {site}: " + ("not registered yet" if node_id is None else f"node {node_id}, unknown to "
                                         "the SuperLink (its database was replaced?)"))
            continue
        state = str(info.get("status", "?"))
        if state == "online":
            connected += 1
            rows.append(f"  {site}: connected (node {node_id}, since {info.get('online-at', '?')})")
        elif state == "offline":
            rows.append(f"  {site}: not connected (node {node_id}, offline since {info.get('offline-at', '?')})")
        else:
            rows.append(f"  {site}: not connected (node {node_id}, {state}; never joined)" if state == "registered"
                        else f"  {site}: {state} (node {node_id})")
    others = sorted(set(status) - set(registry.node_ids.values()))
    rows += [f"  node {n}: {status[n].get('status', '?')} (not in [hospitals])" for n in others]
    return [f"hospitals: {len(sites)} registered, {connected} connected", *rows]


def server_status(cfg: ServerDeployConfig) -> str:
    """``medsynth server status``: whether the daemon runs, which hospitals are registered and
    connected, the run's progress and privacy, and where its logs and digests are."""
    info_path = cfg.state_dir / "daemon.json"
    running, nodes = "not running", None
    if info_path.exists():
        info = json.loads(info_path.read_text())
        alive = bool(info.get("pid")) and Path(f"/proc/{info['pid']}").exists()
        if alive:
            running = f"running (pid {info['pid']}, {info['address']})"
            nodes = list_nodes(cfg)
    logs = f"logs: {cfg.state_dir / 'superlink.log'}, {cfg.state_dir / 'run.log'} (newest start; earlier in " \
           f"{cfg.state_dir / 'logs'})"
    return "\n".join([f"server: {running}", *hospital_lines(cfg, nodes),
                      format_status(read_server_state(cfg.results_dir), cfg), logs])


def already_registered_line(site: str, node_id: int | None, states: dict[str, object]) -> str:
    """The line for a key the SuperLink already holds: registered, or unregistered for good."""
    if node_id is not None and states.get(str(node_id)) == "unregistered":
        return (f"hospital {site}: its key was unregistered (node {node_id}) and Flower refuses it for good; "
                f"remove {site} from [hospitals] or register a new key for it (deploy/README.md, section 6)")
    return f"hospital {site} already registered" + (f" (node {node_id})" if node_id is not None else "")


def list_nodes(cfg: ServerDeployConfig) -> list[dict[str, str]] | None:
    """``flwr supernode list`` of the running SuperLink (None when it does not answer)."""
    link = SuperLinkDaemon(cfg)
    if not link.env.config_path.is_file():
        return None
    try:
        data = flwr_json(["supernode", "list", link.env.connection], link, 30.0)
    except SuperLinkError:
        return None
    nodes = data.get("nodes")
    return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else None
