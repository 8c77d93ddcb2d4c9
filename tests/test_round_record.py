"""The typed round record: JSON round trip, the on-disk shape, and strict reading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.round_record import (
    Initialisation,
    InProcessRun,
    ReceivedMessage,
    RecordError,
    RoundMetrics,
    RoundRecord,
    SecureStats,
    ServerState,
    SiteCost,
    SitePrivacyReport,
    StoppedEarly,
    history_from_json,
    history_to_json,
    read_server_state,
    write_server_state,
)

SITES = ("site-0", "site-1", "site-2")


def _secure_round(r: int) -> RoundRecord:
    """A finished secure round with every part filled in."""
    received = [ReceivedMessage("train", str(r), 120, "ab" * 32), ReceivedMessage("train.secagg_mask", str(r), 900,
                                                                                  "cd" * 32)]
    return RoundRecord(
        round=r,
        sites_trained=SITES[:2],
        sites_budget_exhausted=("site-2",),
        failures=("mask: node 7: timeout",),
        privacy={"site-0": SitePrivacyReport("ok", 1.25 * r, 10.0, 1e-5, 20 * r, noise_multiplier=1.1),
                 "site-1": SitePrivacyReport("ok", 1.5 * r, 10.0, 1e-5, 20 * r),
                 "site-2": SitePrivacyReport("budget-exhausted", 9.9, 10.0, 1e-5, 400)},
        seconds=4.25,
        metrics=RoundMetrics(loss_d_fake=0.69, loss_g=0.81),
        costs={s: SiteCost.of(received) for s in SITES[:2]},
        secure=SecureStats(session=1, alive=SITES[:2], dead=(), attempts=1),
    )


def _abandoned_round(r: int) -> RoundRecord:
    """A round that produced no update: every hospital declined."""
    return RoundRecord(
        round=r, sites_trained=(), sites_budget_exhausted=SITES, failures=("only 0 hospital(s) trained",),
        privacy={s: SitePrivacyReport("budget-exhausted", 9.9, 10.0, 1e-5, 400) for s in SITES}, seconds=0.5,
        costs={},
    )


def test_a_record_survives_json_and_keeps_the_shape_readers_use() -> None:
    # prepare
    record = _secure_round(3)
    # act
    data = json.loads(json.dumps(record.to_json()))
    back = RoundRecord.from_json(data, source="test")
    # assert: equal, and the keys are those the report, summary.json and the tests read
    assert back == record
    assert set(data) == {"round", "sites_trained", "sites_budget_exhausted", "failures", "privacy", "seconds",
                         "loss_d_fake", "loss_g", "costs", "secure"}
    assert set(data["privacy"]["site-0"]) == {"status", "epsilon", "epsilon_budget", "delta", "steps",
                                              "noise_multiplier"}
    assert "noise_multiplier" not in data["privacy"]["site-2"]  # declined: no σ (and older records have none)
    assert set(data["costs"]["site-0"]) == {"bytes_up", "received"} and data["costs"]["site-0"]["bytes_up"] == 1020.0
    assert set(data["secure"]) == {"session", "alive", "dead", "attempts"}
    # an abandoned round has no losses and no secure-aggregation stats
    assert not {"loss_d_fake", "loss_g", "secure"} & set(_abandoned_round(4).to_json())


def test_the_records_file_round_trips_with_its_optional_parts(tmp_path: Path) -> None:
    # prepare: a server run that stopped early, and an in-process run without DP (budget inf)
    server = ServerState(rounds=(_secure_round(1), _secure_round(2)), finished=True, secure_aggregation=True,
                         run_id=7, stopped_early=StoppedEarly("round 3: no hospital could train", _abandoned_round(3)),
                         initialisation=Initialisation.public("ab" * 32, "round-0009.safetensors"))
    no_budget = SitePrivacyReport("ok", 0.0, math.inf, 1e-5, 3)
    in_process = ServerState(
        rounds=(RoundRecord(round=1, sites_trained=("site-0",), sites_budget_exhausted=(), failures=(),
                            privacy={"site-0": no_budget}, seconds=1.0, metrics=RoundMetrics(0.7, 0.8)),),
        finished=True, secure_aggregation=False, in_process=InProcessRun(wall_seconds=2.5),
        initialisation=Initialisation.random(0))
    for name, state in (("server", server), ("in-process", in_process)):
        path = tmp_path / name / "server_state.json"
        path.parent.mkdir()
        # act
        write_server_state(path, state)
        # assert
        assert read_server_state(path) == state
    raw = json.loads((tmp_path / "server" / "server_state.json").read_text())
    assert raw["stopped_early"] == "round 3: no hospital could train" and raw["run_id"] == 7
    assert raw["last_round_attempted"]["sites_budget_exhausted"] == list(SITES)
    assert raw["initialisation"] == {"public_sha256": "ab" * 32, "public_file": "round-0009.safetensors"}
    raw = json.loads((tmp_path / "in-process" / "server_state.json").read_text())
    assert raw["in_process"] is True and "run_id" not in raw and "stopped_early" not in raw
    assert raw["initialisation"] == {"seed": 0}
    assert raw["rounds"][0]["privacy"]["site-0"]["epsilon_budget"] is None  # strict JSON has no inf
    assert read_server_state(tmp_path / "nowhere.json") is None


def test_a_checkpoint_history_round_trips() -> None:
    history = (_secure_round(1), _secure_round(2))
    assert history_from_json(history_to_json(history), source="round-0002.safetensors") == history


def _with(data: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    """A deep copy of ``data`` with the key at ``path`` set to ``value`` (or deleted if ``...``)."""
    out = json.loads(json.dumps(data))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return dict(out)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("noise_multiplier",), 1.1, r"unknown key\(s\) \['noise_multiplier'\]"),
        (("privacy", "site-0", "patients"), 16, r"privacy of site-0: unknown key\(s\) \['patients'\]"),
        (("sites_budget_exhausted",), ..., r"missing key\(s\) \['sites_budget_exhausted'\]"),
        (("privacy", "site-1", "delta"), ..., r"privacy of site-1: missing key\(s\) \['delta'\]"),
        (("costs", "site-0", "received", 0, "sha256"), ..., r"received message: missing key\(s\) \['sha256'\]"),
        (("secure", "dead"), ..., r"secure: missing key\(s\) \['dead'\]"),
        (("loss_g",), ..., r"'loss_d_fake' and 'loss_g' come together"),
        (("round",), "3", r"'round' must be an integer"),
        (("privacy", "site-0", "status"), "error", r"'status' must be one of"),
    ],
)
def test_unknown_missing_or_mistyped_keys_are_refused_naming_the_file(
    path: tuple[Any, ...], value: object, message: str
) -> None:
    bad = _with(_secure_round(3).to_json(), path, value)
    with pytest.raises(RecordError, match=r"^/runs/a/server_state\.json: .*" + message):
        RoundRecord.from_json(bad, source=Path("/runs/a/server_state.json"))


def test_the_records_file_is_read_strictly(tmp_path: Path) -> None:
    # prepare
    good = ServerState(rounds=(_secure_round(1),), finished=False, secure_aggregation=True, run_id=7).to_json()
    cases = {
        "unknown.json": {**good, "note": "x"},
        "missing.json": {k: v for k, v in good.items() if k != "finished"},
        "half.json": {**good, "stopped_early": "round 2"},  # without the round it stopped at
        "round.json": {**good, "rounds": [{**good["rounds"][0], "extra": 1}]},
        "init.json": {**good, "initialisation": {"seed": 0, "public_sha256": "ab" * 32, "public_file": "x"}},
        "init-half.json": {**good, "initialisation": {"public_sha256": "ab" * 32}},
    }
    for name, data in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "torn.json").write_text(json.dumps(good)[:40])
    # act / assert: each refusal names its file
    for name in (*cases, "torn.json"):
        with pytest.raises(RecordError, match=rf"^{tmp_path / name}: "):
            read_server_state(tmp_path / name)


def test_a_record_says_losses_exactly_when_a_hospital_trained() -> None:
    with pytest.raises(RecordError, match="losses are recorded exactly when a hospital trained"):
        RoundRecord(round=1, sites_trained=(), sites_budget_exhausted=(), failures=(), privacy={}, seconds=0.0,
                    metrics=RoundMetrics(0.7, 0.8))
    with pytest.raises(RecordError, match="losses are recorded exactly when a hospital trained"):
        RoundRecord(round=1, sites_trained=("site-0",), sites_budget_exhausted=(), failures=(), privacy={},
                    seconds=0.0)
    with pytest.raises(RecordError, match="round metrics must be loss_d_fake and loss_g"):
        RoundMetrics.from_means({"loss_d_fake": 0.7})


def test_round_lines_and_server_status_show_each_hospitals_sigma(tmp_path: Path) -> None:
    from server.daemon import format_status
    from server.rounds import describe_round
    from server.server_config import ServerDeployConfig

    # prepare: a round where site-0 trained at σ = 1.1 and site-2 declined
    record = _secure_round(2)
    cfg = ServerDeployConfig(host="127.0.0.1", port=9093, state_dir=tmp_path, ca_certificate=tmp_path / "ca.pem",
                             certificate=tmp_path / "s.pem", private_key=tmp_path / "s.key", hospitals={},
                             run_overrides={"num-server-rounds": 3}, app_dir=Path(__file__).resolve().parents[1])
    # act
    line = describe_round(record, 3)
    status = format_status(ServerState(rounds=(record,), finished=False, secure_aggregation=True), cfg)
    # assert: σ beside ε where a hospital reported one, nothing invented where it did not
    assert "site-0 ε=2.50/10 σ=1.1" in line and "site-2 ε=9.90/10 (budget spent)" in line
    assert "site-0: ε = 2.500 of 10 at δ = 1e-05 (40 steps, last σ = 1.1, ok)" in status
    assert "site-1: ε = 3.000 of 10 at δ = 1e-05 (40 steps, ok)" in status
