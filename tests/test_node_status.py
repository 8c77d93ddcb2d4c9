"""What a hospital node says: one line per round while it runs, and ``medsynth node status``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.audit import AuditEntry, append_entry
from client.ledger import PrivacyLedger
from client.node_config import NodeDeployConfig
from client.status import DAEMON_FILE, NodeWatcher, node_status, start_log_path
from common.dp.accounting import Charge
from medsynth.cli import main
from tests.test_daemon_config import _node_doc, _write


@pytest.fixture
def cfg(tmp_path: Path) -> NodeDeployConfig:
    doc = _node_doc(tmp_path)
    doc["node"]["max-epsilon-per-run"] = 4.0
    return NodeDeployConfig.load(_write(tmp_path / "node.toml", doc))


def _reply(run: str, group: str, status: str, eps: float | None, sigma: float | None, action: str = "train",
           detail: str = "") -> AuditEntry:
    return AuditEntry(time=time.time(), run=run, group=group, action=action, site="site-0", status=status, bytes=10,
                      sha256="ab" * 32, epsilon=eps, detail=detail, noise_multiplier=sigma)


def _charge(cfg: NodeDeployConfig, sigma: float, run: int, server_round: int) -> None:
    ledger = PrivacyLedger.open(cfg.ledger_path, site=cfg.site_id, accountant="prv", delta=1e-5,
                                epsilon_budget=cfg.epsilon_budget, audit_path=cfg.audit_path)
    ledger.charge(Charge(sigma, 0.15, 10), run=run, round=server_round)


def test_the_node_prints_one_line_per_round_and_when_a_run_begins(cfg: NodeDeployConfig, tmp_path: Path) -> None:
    # prepare: a run before the daemon started (not repeated), then what the ClientApps write while it runs
    _charge(cfg, 1.0, 6, 1)
    append_entry(cfg.audit_path, _reply("6", "1", "ok", 1.0, 1.0))
    lines: list[str] = []
    log = start_log_path(cfg.state_dir, time.time())
    log.parent.mkdir(parents=True)
    watcher = NodeWatcher(cfg, lines.append, log)
    _charge(cfg, 1.5, 7, 1)
    append_entry(cfg.audit_path, _reply("7", "1", "ok", 2.5, 1.5))
    append_entry(cfg.audit_path, _reply("7", "1", "-", None, None, action="train.secagg_mask"))
    append_entry(cfg.audit_path, _reply("7", "2", "budget-exhausted", 3.9, None))
    append_entry(cfg.audit_path, _reply("7", "3", "error", None, None,
                                        detail="NoiseRefused: the run would train at σ = 12"))
    log.write_text("INFO     medsynth: app allow-list: accepted app bundle sha256 abc (on …)\n" * 3
                   + "ERROR    medsynth: app allow-list: refused app bundle sha256 def: not on …\n")
    # act
    watcher.poll()
    watcher.poll()  # nothing new: nothing said twice
    # assert: the run's line, then one per round (the mask step that went fine says nothing); the
    # allow-list's first acceptance and every refusal
    text = "\n".join(lines)
    assert len(lines) == 6, text
    assert "run 7 began: it may take ε from" in lines[2] and "max-epsilon-per-run 4" in lines[2]
    assert lines[3].endswith("run 7 round 1: trained at σ = 1.5; ε after 2.5000")
    assert "run 7 round 2: declined" in lines[4] and "ε after 3.9000" in lines[4]
    assert "run 7 round 3: train refused (NoiseRefused: the run would train at σ = 12)" in lines[5]
    assert lines[0].endswith("app allow-list: accepted app bundle sha256 abc (on …)")
    assert "app allow-list: refused app bundle sha256 def" in lines[1]
    assert "run 6" not in text


def test_node_status_says_what_runs_what_is_spent_and_where_the_logs_are(
    cfg: NodeDeployConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: nothing yet; then a round, and a daemon.json of this (live, medsynth-running) process
    fresh, fresh_code = node_status(cfg)
    _charge(cfg, 1.2, 3, 1)
    append_entry(cfg.audit_path, _reply("3", "1", "ok", 1.1, 1.2))
    log = start_log_path(cfg.state_dir, time.time())
    log.parent.mkdir(parents=True)
    log.write_text("")
    # The child says it runs before the test reads /proc: Popen returns once the exec closed its
    # close-on-exec pipe, which is before the kernel sets the new command line (read empty until then).
    daemon = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                               "medsynth-node-daemon"], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "up\n"
        (cfg.state_dir / DAEMON_FILE).write_text(json.dumps(
            {"pid": daemon.pid, "supernode_pid": 1, "tag": "t", "runtime_port": 9094, "log": str(log), "started": 0}))
        # act
        code = main(["node", "status", "--config", str(cfg.state_dir.parent / "node.toml")])
        out = capsys.readouterr().out
    finally:
        daemon.kill()
        daemon.communicate()  # waits, and closes its pipe
    gone, _ = node_status(cfg)
    # assert
    assert fresh_code == 0 and "nothing spent yet: budget ε 10" in fresh and "last round: none yet" in fresh
    assert "not running (never started here)" in fresh
    assert code == 0
    assert f"running (pid {daemon.pid}" in out and "runtime port 9094" in out
    assert "node site-0: not running\n" in gone  # its PID gone
    assert "ε spent" in out and "of budget 10" in out and "left" in out
    assert "one run may add at most ε 4 ([node] max-epsilon-per-run)" in out
    assert "σ > 10 is refused ([node] max-noise-multiplier)" in out
    assert "last round: run 3 round 1: trained at σ = 1.2; ε after 1.1000" in out
    assert f"logs: SuperNode {log}" in out and str(cfg.audit_path) in out


def test_node_status_flags_a_ledger_that_cannot_be_trusted(cfg: NodeDeployConfig) -> None:
    # prepare: a round charged, then the ledger deleted (its audit log remembers it)
    _charge(cfg, 1.2, 3, 1)
    cfg.ledger_path.unlink()
    # act
    text, code = node_status(cfg)
    # assert: said, and exit 2 for monitoring
    assert code == 2 and "the ledger cannot be used" in text and "missing" in text
