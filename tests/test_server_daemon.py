"""``medsynth server start|status`` without a federation: exit codes, the waiting lines, what the
console shows of a failed run, logs kept per start, a finished run that is not started again, and
the hospitals ``server status`` lists. The real SuperLink cases (killed, no hospitals, port in use)
are in ``tests/test_deploy_tls.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from common.certs import create_ca, create_node_auth_keys, issue_server_certificate
from common.errors import EXIT_FIX_CONFIG, EXIT_RESTARTABLE
from common.flower import RunFailedError
from common.round_record import (
    RecordError,
    RoundMetrics,
    RoundRecord,
    ServerState,
    SitePrivacyReport,
    StoppedEarly,
    write_server_state,
)
from medsynth.cli import main
from server.daemon import (
    LOGS_KEPT,
    ConsoleLines,
    RunNeedsAttention,
    RunStopped,
    ServerCrashed,
    SuperLinkDaemon,
    already_registered_line,
    finished_already,
    hospital_lines,
    log_for_this_start,
    server_status,
)
from server.outcome import LAST_ERROR_FILE, ServerAppError
from server.registry import HOSPITALS_FILE, NodeRegistry
from server.rounds import NoHospitals, wait_for_nodes, waiting_line
from server.server_config import ServerDeployConfig

REPO = Path(__file__).resolve().parents[1]
REGISTRY = NodeRegistry({"site-0": 11, "site-1": 22, "site-2": 33})


# ------------------------------------------------------------------------------- waiting lines
def test_the_waiting_line_names_who_joined_and_who_is_missing() -> None:
    assert waiting_line([22], 3, REGISTRY) == "waiting for hospitals: 1 of the 3 needed joined (site-1); " \
                                              "missing: site-0, site-2"
    assert waiting_line([], 2, REGISTRY) == "waiting for hospitals: 0 of the 2 needed joined; " \
                                            "missing: site-0, site-1, site-2"
    # a node the registry does not know (a simulation, an older state folder) is named by its id
    assert waiting_line([7], 2, NodeRegistry()) == "waiting for hospitals: 1 of the 2 needed joined (node 7)"


class _Clock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Grid:
    """Who is connected at each second (the last entry stays)."""

    def __init__(self, timeline: dict[int, list[int]]) -> None:
        self.timeline, self.clock = timeline, _Clock()

    def get_node_ids(self) -> list[int]:
        at = max(t for t in self.timeline if t <= self.clock.now)
        return self.timeline[at]


def _wait(grid: _Grid, minimum: int, timeout_s: float) -> tuple[list[int] | None, list[tuple[float, str]], str]:
    said: list[tuple[float, str]] = []
    try:
        nodes = wait_for_nodes(grid, minimum, timeout_s, REGISTRY,  # type: ignore[arg-type]
                               say=lambda line: said.append((grid.clock.now, line)), clock=grid.clock,
                               sleep=grid.clock.sleep)
    except NoHospitals as exc:
        return None, said, str(exc)
    return nodes, said, ""


def test_waiting_is_said_on_each_change_and_every_30_seconds() -> None:
    # prepare: site-0 joins at 10 s, site-2 at 75 s
    grid = _Grid({0: [], 10: [11], 75: [11, 33]})
    # act
    nodes, said, _ = _wait(grid, 2, 600)
    # assert
    assert nodes == [11, 33]
    assert [t for t, _ in said] == [0, 10, 40, 70, 75]
    assert said[1][1] == "waiting for hospitals: 1 of the 2 needed joined (site-0); missing: site-1, site-2"
    assert said[-1][1] == "hospitals joined: 2 of the 2 needed (site-0, site-2)"


def test_waiting_is_silent_when_enough_hospitals_are_there() -> None:
    assert _wait(_Grid({0: [11, 22, 33]}), 3, 60) == ([11, 22, 33], [], "")


def test_the_wait_ends_in_one_line_naming_the_missing_hospitals() -> None:
    # act
    nodes, said, message = _wait(_Grid({0: [22]}), 3, 5)
    # assert
    assert nodes is None and len(said) == 1
    assert message == ("only 1 of the 3 hospitals needed joined within 5 s (missing: site-0, site-2); check that "
                       "their nodes run and reach the SuperLink; the next start waits again")
    assert NoHospitals.exit_code == EXIT_RESTARTABLE  # a late hospital is transient: systemd starts it again


# ------------------------------------------------------------------------ a failed run, told
def test_the_console_shows_the_run_but_not_flowers_error_epilogue() -> None:
    # prepare: the lines `flwr log` streams when the ServerApp raises
    lines = ["INFO :      Start `flwr-serverapp` process",
             "2026-12-02 10:26:21,967 medsynth.server waiting for hospitals: 0 of the 3 needed joined",
             "ERROR :     ServerApp raised an exception", "Traceback (most recent call last):",
             '  File "rounds.py", line 91, in wait_for_nodes', "server.rounds.NoHospitals: only 0 of …",
             "ERROR :     Exit Code: 201", "For more information, visit: <https://flower.ai/docs/…>"]
    shown: list[str] = []
    console = ConsoleLines(shown.append)
    # act
    for line in ["╭─ Error ───╮", "│ Connection to the SuperLink is unavailable. │", "╰───────────╯", *lines]:
        console(line)
    # assert
    assert shown == lines[:2]


@pytest.fixture
def server_cfg(tmp_path: Path) -> ServerDeployConfig:
    return ServerDeployConfig.load(_server_toml(tmp_path), REPO)


def _server_toml(tmp: Path, **run: Any) -> Path:
    ca = create_ca(tmp / "ca")
    tls = issue_server_certificate(ca, ["127.0.0.1"], tmp / "tls")
    keys = {site: create_node_auth_keys(tmp / "h", site).public for site in ("site-0", "site-1", "site-2")}
    doc = {"superlink": {"port": 9093, "state-dir": str(tmp / "state")},
           "tls": {"ca-certificate": str(ca.public), "certificate": str(tls.public), "private-key": str(tls.private)},
           "hospitals": {site: str(k) for site, k in keys.items()},
           "run": {"num-server-rounds": 2, **run}}
    path = tmp / "server.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@pytest.fixture
def exited() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that has exited (as a killed SuperLink has)."""
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)
    yield proc


def test_a_failed_run_is_told_by_why_the_serverapp_stopped(server_cfg: ServerDeployConfig,
                                                           exited: subprocess.Popen[bytes]) -> None:
    # prepare
    daemon = SuperLinkDaemon(server_cfg)
    record = server_cfg.results_dir / LAST_ERROR_FILE
    failed = RunFailedError("Run 5 ended with status 'finished:failed' …\ntraceback", run_id=5,
                            status="finished:failed", log_tail="")

    def told() -> Any:
        return daemon.why_it_failed(failed)

    # act / assert: the ServerApp's own error, restartable or not, is the one line
    ServerAppError.of(NoHospitals("only 0 of the 3 hospitals needed joined"), 5).write(record)
    assert isinstance(told(), RunStopped) and told().exit_code == EXIT_RESTARTABLE
    assert str(told()) == "only 0 of the 3 hospitals needed joined"
    ServerAppError(5, "RecordError", "server_state.json is not JSON", restartable=False).write(record)
    assert isinstance(told(), RunNeedsAttention) and told().exit_code == EXIT_FIX_CONFIG
    # another run's record is not this run's reason: the ServerApp died (killed, a bug)
    ServerAppError(4, "RecordError", "older", restartable=False).write(record)
    assert isinstance(told(), ServerCrashed) and told().exit_code == EXIT_RESTARTABLE
    # the run's time limit is the operator's to raise
    timeout = RunFailedError("…", run_id=5, status="timeout", log_tail="")
    assert daemon.why_it_failed(timeout).exit_code == EXIT_FIX_CONFIG
    # the SuperLink died under the run: whatever `flwr` said, the next start resumes
    daemon.proc = exited
    assert isinstance(told(), ServerCrashed) and "SuperLink exited unexpectedly (code 3)" in str(told())


def test_the_serverapps_error_record_is_one_line_of_its_run(tmp_path: Path) -> None:
    record = ServerAppError.of(NoHospitals("only 1 of 3\njoined"), 9)
    record.write(tmp_path / "e.json")
    assert ServerAppError.read(tmp_path / "e.json", 9) == ServerAppError(9, "NoHospitals", "only 1 of 3 joined", True)
    assert ServerAppError.read(tmp_path / "e.json", 8) is None
    assert ServerAppError.read(tmp_path / "missing.json", 9) is None


# ------------------------------------------------------------------------------ exit code 2
def test_a_misconfigured_server_start_exits_2_in_one_line(tmp_path: Path) -> None:
    # prepare: the private key moved away
    config = _server_toml(tmp_path)
    (tmp_path / "tls" / "server.key").rename(tmp_path / "server.key.moved")
    # act: the real command, as systemd runs it
    done = subprocess.run([sys.executable, "-m", "medsynth", "server", "start", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    # assert
    assert done.returncode == EXIT_FIX_CONFIG
    assert done.stderr.splitlines() == [f"medsynth: error: [tls] private-key = {tmp_path / 'tls' / 'server.key'}: "
                                        "no such file (make it with `medsynth certs`)"]
    assert not (tmp_path / "state").exists()  # nothing was started


def test_an_unknown_run_key_in_server_toml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _server_toml(tmp_path, **{"num-rounds": 3})
    assert main(["server", "start", "--config", str(config)]) == EXIT_FIX_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num-rounds" in err


# ------------------------------------------------------------------ a finished run, restarted
def _record(r: int, status: str = "ok") -> RoundRecord:
    trained = ("site-0",) if status == "ok" else ()
    return RoundRecord(round=r, sites_trained=trained, sites_budget_exhausted=() if trained else ("site-0",),
                       failures=(), seconds=1.0, metrics=RoundMetrics(0.7, 0.8) if trained else None,
                       privacy={"site-0": SitePrivacyReport(status, 1.0 * r, 10.0, 1e-5, 10 * r)})  # type: ignore[arg-type]


def test_a_finished_run_is_not_started_again(server_cfg: ServerDeployConfig,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: both planned rounds done
    write_server_state(server_cfg.results_dir / "server_state.json",
                       ServerState(rounds=(_record(1), _record(2)), finished=True, secure_aggregation=True))
    config = server_cfg.state_dir.parent / "server.toml"
    # act
    code = main(["server", "start", "--config", str(config)])
    # assert: exit 0, said in one line with where the results are, and nothing started
    out = capsys.readouterr().out
    assert code == 0
    assert f"the run has finished: round 2 of 2; nothing to do, nothing started. Results: {server_cfg.results_dir}" \
           in out
    assert not (server_cfg.state_dir / "daemon.json").exists() and not (server_cfg.state_dir / "logs").exists()


def test_only_a_run_with_nothing_left_counts_as_finished() -> None:
    two = ServerState(rounds=(_record(1), _record(2)), finished=True, secure_aggregation=True)
    assert finished_already(two, 2)
    assert not finished_already(two, 3)  # more rounds planned since: it continues
    assert not finished_already(ServerState(rounds=(_record(1),), finished=False, secure_aggregation=True), 1)
    spent = StoppedEarly("round 2: no hospital could train", _record(2, "budget-exhausted"))
    stopped = ServerState(rounds=(_record(1),), finished=True, secure_aggregation=True, stopped_early=spent)
    assert finished_already(stopped, 5)
    assert not finished_already(None, 1)


# --------------------------------------------------------------------------- logs per start
def test_logs_are_kept_per_start_and_the_link_names_the_newest(tmp_path: Path) -> None:
    # prepare: a log written before logs were kept per start
    (tmp_path / "run.log").write_text("the first start\n")
    # act
    paths = [log_for_this_start(tmp_path, "run", f"20270101-0000{i:02d}") for i in range(LOGS_KEPT + 2)]
    again = log_for_this_start(tmp_path, "run", f"20270101-0000{LOGS_KEPT + 1:02d}")  # within the same second
    early = log_for_this_start(tmp_path, "run", "19990101-000000")  # the clock went back: still this start's
    # assert
    kept = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert len(kept) == LOGS_KEPT and {again.name, early.name, paths[-1].name} <= set(kept)
    assert again != paths[-1] and "run-00000000-000000.log" not in kept  # the oldest went first
    assert (tmp_path / "run.log").is_symlink() and (tmp_path / "run.log").resolve() == early.resolve()


# ---------------------------------------------------------------------------- server status
def test_status_lists_registered_and_connected_hospitals(server_cfg: ServerDeployConfig) -> None:
    # prepare: site-0 online, site-1 offline, site-2 registered but never connected
    REGISTRY.write(server_cfg.results_dir / HOSPITALS_FILE)
    nodes = [{"node-id": "11", "status": "online", "online-at": "2026-12-02 10:00:00Z"},
             {"node-id": "22", "status": "offline", "offline-at": "2026-12-02 10:05:00Z"},
             {"node-id": "33", "status": "registered"}]
    # act
    running = hospital_lines(server_cfg, nodes)
    stopped = hospital_lines(server_cfg, None)
    # assert
    assert running == ["hospitals: 3 registered, 1 connected",
                       "  site-0: connected (node 11, since 2026-12-02 10:00:00Z)",
                       "  site-1: not connected (node 22, offline since 2026-12-02 10:05:00Z)",
                       "  site-2: not connected (node 33, registered; never joined)"]
    assert stopped == ["hospitals: 3 registered (site-0, site-1, site-2); connections unknown: the server is not "
                       "running"]


def test_status_says_where_the_digests_a_hospital_compares_are(server_cfg: ServerDeployConfig) -> None:
    text = server_status(server_cfg)
    assert "server: not running" in text
    assert f"digests of what each hospital sent: {server_cfg.results_dir / 'server_state.json'}" in text
    assert "medsynth node audit" in text and str(server_cfg.state_dir / "run.log") in text


def test_the_registry_reads_what_it_wrote_and_refuses_anything_else(tmp_path: Path) -> None:
    REGISTRY.write(tmp_path / "h.json")
    assert NodeRegistry.read(tmp_path / "h.json") == REGISTRY
    assert NodeRegistry.read(tmp_path / "none.json") == NodeRegistry()
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "node_ids": {"site-0": "11"}}))
    with pytest.raises(RecordError, match="not a node registry"):
        NodeRegistry.read(tmp_path / "bad.json")


def test_a_key_unregistered_for_good_is_named_at_start_not_called_registered(
    server_cfg: ServerDeployConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prepare: the SuperLink (stubbed: a unit test of the wording) lists node 7 as unregistered
    import server.daemon as daemon_module

    listed = {"nodes": [{"node-id": "7", "status": "unregistered"}, {"node-id": "8", "status": "online"}]}
    monkeypatch.setattr(daemon_module, "flwr_json", lambda args, link, timeout: listed)
    daemon = SuperLinkDaemon(server_cfg)
    states = daemon._node_states()
    # act
    gone, live, unknown = (already_registered_line("site-1", 7, states), already_registered_line("site-2", 8, states),
                           already_registered_line("site-0", None, states))
    # assert
    assert "unregistered (node 7)" in gone and "remove site-1 from [hospitals]" in gone
    assert live == "hospital site-2 already registered (node 8)"
    assert unknown == "hospital site-0 already registered"
