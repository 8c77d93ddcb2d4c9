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

If the SuperLink dies under it (killed, out of memory) the daemon stops what is left of it,
including the ServerApp, and exits with status 1 and a message saying the next start resumes;
the service manager (systemd ``Restart=on-failure``, compose ``restart: on-failure``) restarts it.
``STATE/daemon.json`` names the running processes (PIDs and the process tag).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from common import round_record
from common.atomic import write_json_atomic
from common.config import ConfigError
from common.errors import EXIT_RESTARTABLE
from common.flower import (
    CertificateNotTrusted,
    FlowerEnv,
    NotHealthy,
    RunFailedError,
    ServerTls,
    SuperLinkError,
    flwr_json,
    run_app,
    spawn,
    superlink_command,
    terminate_then_kill,
    wait_healthy,
)
from common.round_record import ServerState, SitePrivacyReport
from server.server_config import ServerDeployConfig, app_defaults

STARTUP_TIMEOUT_S = 60.0
#: Seconds between SIGTERM and SIGKILL when the SuperLink and its ServerApp are stopped.
STOP_GRACE_S = 15.0


class ServerCrashed(SuperLinkError):
    """The SuperLink or its run ended unexpectedly; a restart resumes from the last checkpoint."""

    exit_code = EXIT_RESTARTABLE  # systemd restarts it (the unit prevents a restart on 2 only)


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
        self.flwr_home = cfg.flwr_home
        self.log_path = cfg.state_dir / "superlink.log"
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
        self.proc = spawn(self.superlink_command(), self.env.environ(), self.log_path, cwd=self.flwr_home,
                          append=True)
        self.write_pid_file()
        try:
            wait_healthy(self.proc, self.env, log_path=self.log_path, timeout_s=STARTUP_TIMEOUT_S)
        except CertificateNotTrusted as exc:
            raise ServerCrashed(
                f"{exc}. Issue it with `medsynth certs server` (it names localhost and 127.0.0.1 as well as "
                "your --host names)."
            ) from exc
        except NotHealthy as exc:
            raise ServerCrashed(str(exc)) from exc
        self.env.write_config()

    def register_hospitals(self) -> None:
        """Register each hospital's public key; keys already in the SQLite state are kept."""
        for site, key in sorted(self.cfg.hospitals.items()):
            try:
                data = flwr_json(["supernode", "register", str(key), self.env.connection, "--name", site], self, 60.0)
                self.say(f"registered hospital {site} (node {data.get('node-id')})")
            except SuperLinkError as exc:
                if "already in use" not in str(exc):
                    raise
                self.say(f"hospital {site} already registered")

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
        """Start, register, run to the end; returns the final server state."""
        self.start_superlink()
        self.say(f"SuperLink up at {self.env.base_url} (TLS, node authentication, state {self.cfg.database})")
        self.register_hospitals()
        # only now can every hospital connect: a node that dials before its key is registered is
        # refused as unknown (and stops, exit 2), so operators and tests wait for this line
        self.say(f"accepting hospitals: {len(self.cfg.hospitals)} registered ({', '.join(sorted(self.cfg.hospitals))})")
        state = read_server_state(self.cfg.results_dir)
        done = len(state.rounds) if state is not None else 0
        if done:
            self.say(f"resuming: {done} round(s) completed before; continuing from the last good checkpoint")
        overrides = {**self.cfg.run_overrides, "output-dir": str(self.cfg.results_dir)}
        try:
            run_app(self.cfg.app_dir, self, run_config=overrides, log_path=self.cfg.state_dir / "run.log",
                    timeout_s=self.cfg.run_timeout_s, on_line=self.say)
        except (RunFailedError, SuperLinkError) as exc:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerCrashed(
                    f"the SuperLink exited unexpectedly (code {self.proc.returncode}). Start the server again: "
                    "the run resumes from the last completed round's checkpoint."
                ) from exc
            raise
        return read_server_state(self.cfg.results_dir)


def read_server_state(results_dir: Path) -> ServerState | None:
    """The run's records file (None before the first round finished); a malformed one is a ConfigError."""
    try:
        return round_record.read_server_state(results_dir / round_record.RECORDS_FILE)
    except round_record.RecordError as exc:
        raise ConfigError(str(exc)) from exc


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start_server(cfg: ServerDeployConfig, say: Callable[[str], None] = print) -> ServerState | None:
    """``medsynth server start``: run the federation; the SuperLink is stopped however this ends."""
    if cfg.state_dir.resolve().is_relative_to(cfg.app_dir.resolve()):
        raise ConfigError(f"[superlink] state-dir {cfg.state_dir} lies inside the app folder {cfg.app_dir}; "
                          "`flwr run` would bundle it. Use a folder outside it.")
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    daemon = SuperLinkDaemon(cfg, say)
    try:
        state = daemon.run()
    finally:
        daemon.stop()
        signal.signal(signal.SIGTERM, previous)
    say(format_status(state, cfg))
    return state


def format_status(state: ServerState | None, cfg: ServerDeployConfig) -> str:
    """Rounds, who took part, and each hospital's cumulative ε (budget spending is not patient data)."""
    rounds = state.rounds if state is not None else ()
    total = {**app_defaults(cfg.app_dir), **cfg.run_overrides}["num-server-rounds"]
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
    lines.append(f"results: {cfg.results_dir}")
    return "\n".join(lines)


def server_status(cfg: ServerDeployConfig) -> str:
    """``medsynth server status``: whether the daemon runs, and the run's progress and privacy."""
    info_path = cfg.state_dir / "daemon.json"
    running = "not running"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        alive = bool(info.get("pid")) and Path(f"/proc/{info['pid']}").exists()
        running = f"running (pid {info['pid']}, {info['address']})" if alive else "not running"
    return f"server: {running}\n" + format_status(read_server_state(cfg.results_dir), cfg)
