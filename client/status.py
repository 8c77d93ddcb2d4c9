"""What a hospital node says about itself: its privacy position, one line per round, ``node status``.

Everything here reads the hospital's own files: the node config, the privacy ledger, the audit
log (one line per message that left, with ε after it and, for a training reply, σ) and the
daemon's ``daemon.json``. Nothing is sent anywhere.

* :func:`privacy_lines`: budget, spent, left and the caps, printed by ``medsynth node start``
  before the SuperNode starts, and by ``medsynth node status``;
* :class:`NodeWatcher`: followed by the node daemon while the SuperNode runs; it prints one
  line per round (round, trained / declined / refused, ε after, σ), a line when a run begins
  (how far it may take ε), and the app allow-list's verdicts from the SuperNode's log;
* :func:`node_status`: ``medsynth node status``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from client.audit import AuditEntry, AuditRecord, parse_line, read_records
from client.node_config import NodeDeployConfig
from common.errors import UserError

DAEMON_FILE = "daemon.json"  # under the state folder: the running daemon's PIDs, port and log
LOG_DIR = "logs"  # under the state folder: one SuperNode log per `medsynth node start`
ALLOWLIST_MARK = "app allow-list:"  # how client.fab_gate's lines begin (the daemon echoes them)


def start_log_path(state_dir: Path, started: float) -> Path:
    """The SuperNode log of one ``medsynth node start`` (restarts within it append to it)."""
    return state_dir / LOG_DIR / time.strftime("supernode-%Y%m%dT%H%M%SZ.log", time.gmtime(started))


def privacy_lines(cfg: NodeDeployConfig) -> list[str]:
    """Budget, spent, left, and what one run may do, from the ledger (checked against the audit log)."""
    from client.ledger import PrivacyLedger

    caps = (f"one run may add at most ε {min(cfg.max_epsilon_per_run, cfg.epsilon_budget):g} "
            f"([node] max-epsilon-per-run); a training round that needs σ > {cfg.max_noise_multiplier:g} is "
            "refused ([node] max-noise-multiplier)")
    try:  # checked against the audit log: a deleted or rolled-back ledger is refused, not shown
        ledger = PrivacyLedger.read(cfg.ledger_path, audit_path=cfg.audit_path)
    except FileNotFoundError:  # no ledger, and the audit log shows none was ever written
        return [f"privacy: nothing spent yet: budget ε {cfg.epsilon_budget:g} at δ = {cfg.delta:g} ({cfg.accountant})",
                f"caps: {caps}"]
    spent = ledger.epsilon()
    return [f"privacy: ε spent {spent:.4f} of budget {cfg.epsilon_budget:g} at δ = {ledger.delta:g} "
            f"({ledger.accountant}); left {max(cfg.epsilon_budget - spent, 0.0):.4f} "
            f"(ledger {cfg.ledger_path})",
            f"caps: {caps}"]


def describe_entry(entry: AuditEntry) -> str | None:
    """One console line for a reply that left: a training reply always, another action only when refused."""
    where = f"run {entry.run} round {entry.group}"
    eps = "" if entry.epsilon is None else f"; ε after {entry.epsilon:.4f}"
    sigma = "" if entry.noise_multiplier is None else f" at σ = {entry.noise_multiplier:.4g}"
    if entry.status == "error":
        return f"{where}: {entry.action} refused ({entry.detail or 'see the node log'})"
    if entry.action != "train":
        return None
    if entry.status == "budget-exhausted":
        return f"{where}: declined: the budget, or this run's max-epsilon-per-run, is spent{eps}"
    done = "released the warm-start class means" if entry.group == "0" else "trained"
    return f"{where}: {done}{sigma}{eps}"


class LineFollower:
    """Complete lines appended to a file since the last call (a file not there yet has none)."""

    def __init__(self, path: Path, *, from_start: bool = False) -> None:
        self.path = path
        self.offset = 0 if from_start or not path.exists() else path.stat().st_size

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        return data[:end].decode("utf-8", errors="replace").splitlines()


class NodeWatcher:
    """Follows the audit log and the SuperNode's log while the daemon runs; says what the node did."""

    def __init__(self, cfg: NodeDeployConfig, say: Callable[[str], None], supernode_log: Path) -> None:
        self.cfg = cfg
        self.say = say
        self.audit = LineFollower(cfg.audit_path)
        self.log = LineFollower(supernode_log)
        self.runs: set[str] = set()
        self.accepted: set[str] = set()

    def poll(self) -> None:
        """Print what happened since the last call."""
        for line in self.log.new_lines():
            self._allowlist(line)
        for line in self.audit.new_lines():
            if not line.strip():
                continue
            try:
                record = parse_line(line)
            except (TypeError, ValueError) as exc:  # the ledger refuses to train on such a log; say so here too
                self.say(f"node {self.cfg.site_id}: unreadable audit log line in {self.cfg.audit_path} ({exc})")
                continue
            if isinstance(record, AuditEntry):
                self._round(record)

    def _allowlist(self, line: str) -> None:
        """The gate's verdicts: every refusal, and the first acceptance of each bundle (one per message follows)."""
        if ALLOWLIST_MARK not in line:
            return
        text = line[line.index(ALLOWLIST_MARK):]
        if " accepted " in text:
            if text in self.accepted:
                return
            self.accepted.add(text)
        self.say(f"node {self.cfg.site_id}: {text}")

    def _round(self, entry: AuditEntry) -> None:
        if entry.action == "train" and entry.status == "ok" and entry.run not in self.runs:
            self.runs.add(entry.run)
            self.say(f"node {self.cfg.site_id}: {self._run_line(entry.run)}")
        text = describe_entry(entry)
        if text is not None:
            self.say(f"node {self.cfg.site_id}: {text}")

    def _run_line(self, run: str) -> str:
        """How far the run that just began may take ε (``common.dp.plan.run_target``)."""
        from client.ledger import PrivacyLedger
        from common.dp.accounting import epsilon_of
        from common.dp.plan import run_target

        c = self.cfg
        ledger = PrivacyLedger.read(c.ledger_path)
        before = epsilon_of([e.charge for e in ledger.entries if str(e.run) != run], ledger.delta, ledger.accountant)
        target = run_target(before, budget=c.epsilon_budget, max_epsilon_per_run=c.max_epsilon_per_run)
        return (f"run {run} began: it may take ε from {before:.4f} to {target:.4f} (budget {c.epsilon_budget:g}, "
                f"max-epsilon-per-run {c.max_epsilon_per_run:g}); its σ is calibrated to end there")


def _daemon_line(cfg: NodeDeployConfig) -> tuple[str, str | None]:
    """Whether the node daemon runs (from ``daemon.json`` and /proc), and its current SuperNode log."""
    path = cfg.state_dir / DAEMON_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "not running (never started here)", None
    pid = info.get("pid")
    alive = isinstance(pid, int) and _is_medsynth(pid)
    log = info.get("log") if isinstance(info.get("log"), str) else None
    if not alive:
        return "not running", log
    return (f"running (pid {pid}, SuperNode pid {info.get('supernode_pid')}, runtime port "
            f"{info.get('runtime_port')}, dialing {cfg.superlink})"), log


def _is_medsynth(pid: int) -> bool:
    """A live process whose command line is a medsynth command (a reused PID is not the daemon)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user (the service user)
    try:
        return b"medsynth" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def last_round(records: list[AuditRecord]) -> str:
    """The newest training reply in the audit log, as a line."""
    trains = [r for r in records if isinstance(r, AuditEntry) and r.action == "train"]
    if not trains:
        return "none yet"
    entry = trains[-1]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.time))
    return f"{describe_entry(entry)} ({stamp})"


def node_status(cfg: NodeDeployConfig) -> tuple[str, int]:
    """``medsynth node status``: the text, and 0, or 2 when the ledger cannot be trusted (a person must look)."""
    running, log = _daemon_line(cfg)
    lines = [f"node {cfg.site_id}: {running}"]
    code = 0
    try:
        lines += privacy_lines(cfg)
    except UserError as exc:
        lines.append(f"privacy: the ledger cannot be used: {exc}")
        code = 2
    lines.append(f"last round: {last_round(read_records(cfg.audit_path))}")
    logs = sorted((cfg.state_dir / LOG_DIR).glob("supernode-*.log"))
    newest = log or (str(logs[-1]) if logs else None)
    lines.append(f"logs: SuperNode {newest or 'none yet'} ({len(logs)} start(s) kept in {cfg.state_dir / LOG_DIR}); "
                 f"audit log {cfg.audit_path}")
    return "\n".join(lines), code
