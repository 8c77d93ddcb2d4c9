"""Server round loop + hospital code in one process: accounting, budgets, resume, dropouts.

The transport is replaced by ``InProcessGrid``, which hands each message to the real
ClientApp handler (``client.app.train``); everything else — prepare, ledger, DP training,
packing, FedAvg, checkpoints — is the production code. The real Flower path (SuperLink,
Simulation Engine) is covered by ``test_simulate_e2e.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant

import client.task
from client.audit import read_entries
from client.ledger import PrivacyLedger
from common.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from common.config import RunConfig
from common.dp.accounting import epsilon_of
from common.protocol.messages import error_reason
from common.round_record import ServerState, read_server_state
from server.rounds import ServerPaths, run_federation
from tests.helpers import RUN_ID, default_run_config
from tests.inprocess import InProcessGrid, fresh_state, write_phantom_sites

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom hospitals written as DICOM: 16 patients × 2 images each."""
    return write_phantom_sites(tmp_path_factory.mktemp("sites"), 3)


def _config(sites_dir: Path, out: Path, **overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sim__sites-dir": str(sites_dir),
        "output-dir": str(out),
        "train__local-steps": 3,
        "train__batch-size": 4,
        "model__g-width": 16,
        "model__d-width": 16,
        "dp__calibrate": False,
        "dp__noise-multiplier": 1.2,
        "dp__sample-rate": 0.25,  # the public q: 4 expected patients of a 16-patient site
        "wait-nodes-timeout": 5.0,
        "secure-aggregation": False,  # these tests are about the plain loop; see test_secure_federation
        "warm-start__budget-share": 0.0,  # round 0: test_warm_start
    }
    base.update(overrides)
    return default_run_config(**base)


def _run(cfg: dict[str, object], out: Path, run_id: int = RUN_ID) -> ServerState:
    grid = InProcessGrid(3, cfg, run_id)
    return run_federation(grid, RunConfig.from_flower(cfg), ServerPaths(out), run_id)  # type: ignore[arg-type]


def _stepwise_epsilon(ledger: PrivacyLedger) -> float:
    """Independent recomputation: a fresh Opacus PRV accountant stepped once per ledger step."""
    acc = PRVAccountant()
    for entry in ledger.entries:
        for _ in range(entry.steps):
            acc.step(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate)
    return float(acc.get_epsilon(delta=ledger.delta))


def test_reported_epsilon_is_cumulative_and_recomputable_from_the_ledger(sites_dir: Path, tmp_path: Path) -> None:
    # prepare
    fresh_state(sites_dir)
    cfg = _config(sites_dir, tmp_path, **{"num-server-rounds": 3})
    # act
    state = _run(cfg, tmp_path)
    # assert
    assert [r.round for r in state.rounds] == [1, 2, 3]
    last = state.rounds[-1].privacy
    for site in ("site-0", "site-1", "site-2"):
        ledger = PrivacyLedger.read(sites_dir / site / "ledger.json")
        assert [(e.run, e.round, e.steps, e.noise_multiplier) for e in ledger.entries] == [
            (RUN_ID, r, 3, 1.2) for r in (1, 2, 3)
        ]
        independent = _stepwise_epsilon(ledger)
        assert last[site].epsilon == pytest.approx(independent, rel=1e-6)
        assert last[site].steps == 9
        per_round_reset = epsilon_of(ledger.charges[-1:], ledger.delta)  # Flower example's bug
        assert last[site].epsilon > 1.3 * per_round_reset


def test_small_budget_stops_training_at_never_above_the_budget(sites_dir: Path, tmp_path: Path) -> None:
    # prepare: a budget that fits two rounds at σ=1.2 but not three
    fresh_state(sites_dir)
    q = 0.25  # the run's public dp.sample-rate
    two, three = (epsilon_of([client.task.Charge(1.2, q, 3 * k)], 1e-5) for k in (2, 3))
    budget = (two + three) / 2
    cfg = _config(sites_dir, tmp_path, **{"num-server-rounds": 5, "dp__epsilon-budget": budget})
    # act
    state = _run(cfg, tmp_path)
    # assert: two rounds trained, the third declined by every hospital, the run ended cleanly
    assert len(state.rounds) == 2
    assert state.finished is True
    stopped = state.stopped_early
    assert stopped is not None and "no hospital could train" in stopped.reason
    assert stopped.last_round_attempted.sites_budget_exhausted == ("site-0", "site-1", "site-2")
    for site in ("site-0", "site-1", "site-2"):
        ledger = PrivacyLedger.read(sites_dir / site / "ledger.json")
        assert ledger.total_steps == 6
        assert ledger.epsilon() <= budget
        assert stopped.last_round_attempted.privacy[site].status == "budget-exhausted"
    saved = json.loads((tmp_path / "server_state.json").read_text())
    assert saved["stopped_early"] == stopped.reason
    assert read_server_state(tmp_path / "server_state.json") == state  # the file holds the whole state


def test_calibrated_noise_ends_the_planned_rounds_at_the_budget(sites_dir: Path, tmp_path: Path) -> None:
    fresh_state(sites_dir)
    cfg = _config(sites_dir, tmp_path, **{"num-server-rounds": 2, "dp__calibrate": True, "dp__epsilon-budget": 4.0})
    state = _run(cfg, tmp_path)
    for site in ("site-0", "site-1", "site-2"):
        eps = PrivacyLedger.read(sites_dir / site / "ledger.json").epsilon()
        assert 4.0 - 0.05 < eps <= 4.0
        assert state.rounds[-1].privacy[site].epsilon == pytest.approx(eps)


def test_resume_continues_round_numbering_without_touching_finished_rounds(sites_dir: Path, tmp_path: Path) -> None:
    # prepare: two finished rounds
    fresh_state(sites_dir)
    cfg2 = _config(sites_dir, tmp_path, **{"num-server-rounds": 2})
    _run(cfg2, tmp_path)
    hashes = {r: load_checkpoint(tmp_path / "checkpoints" / f"round-{r:04d}.safetensors").content_sha256
              for r in (1, 2)}
    # act: the server comes back (new Flower run id) and is asked for 3 rounds in all
    cfg3 = _config(sites_dir, tmp_path, **{"num-server-rounds": 3})
    state = _run(cfg3, tmp_path, RUN_ID + 1)
    # assert
    assert [r.round for r in state.rounds] == [1, 2, 3]
    for r, digest in hashes.items():
        assert load_checkpoint(tmp_path / "checkpoints" / f"round-{r:04d}.safetensors").content_sha256 == digest
    ckpt = latest_valid_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.round == 3
    ledger = PrivacyLedger.read(sites_dir / "site-0" / "ledger.json")
    assert [(e.run, e.round) for e in ledger.entries] == [(RUN_ID, 1), (RUN_ID, 2), (RUN_ID + 1, 3)]


def test_a_hospital_crashing_mid_round_is_still_charged_and_the_round_goes_on(
    sites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: site-1's training dies after its steps were charged
    fresh_state(sites_dir)
    real_train = client.task.train_local_round

    def crash_at_site_1(*args: object, **kwargs: object) -> object:
        data = args[2]
        if data.num_patients == 16 and crash_at_site_1.calls == 1:  # type: ignore[attr-defined]
            crash_at_site_1.calls += 1  # type: ignore[attr-defined]
            raise client.task.AccountingMismatch("simulated crash during training")
        crash_at_site_1.calls += 1  # type: ignore[attr-defined]
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    crash_at_site_1.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(client.task, "train_local_round", crash_at_site_1)
    cfg = _config(sites_dir, tmp_path, **{"num-server-rounds": 1})
    # act
    state = _run(cfg, tmp_path)
    # assert: the round finished with the two others; site-1's ledger still counts its steps
    record = state.rounds[0]
    assert record.sites_trained == ("site-0", "site-2")
    assert f"site-1: {error_reason('internal')}" in record.failures  # a fixed text, no detail
    assert any("simulated crash" in e.detail for e in read_entries(sites_dir / "site-1" / "audit.jsonl"))
    assert PrivacyLedger.read(sites_dir / "site-1" / "ledger.json").total_steps == 3


def test_checkpoints_say_what_they_draw_and_hospitals_keep_the_final_model(sites_dir: Path, tmp_path: Path) -> None:
    # prepare
    fresh_state(sites_dir)
    cfg = _config(sites_dir, tmp_path, **{"num-server-rounds": 2})
    # act
    state = _run(cfg, tmp_path)
    # assert: the server's checkpoint names its classes and run; report.html is there after the run
    server_ckpt = load_checkpoint(tmp_path / "checkpoints" / "round-0002.safetensors")
    assert server_ckpt.class_names == ("normal", "lesion") and server_ckpt.run_id == RUN_ID
    report = (tmp_path / "report.html").read_text()
    assert report.count('src="data:image/') >= 3 and str(RUN_ID) in report  # charts (SVG) and sample grids
    # every hospital kept exactly one model: the final one, after round 2 (sent after the last round)
    sites = ("site-0", "site-1", "site-2")
    final = state.final_model
    assert final is not None and final.round == 2 and final.kept == sites and final.failures == ()
    assert final.content_sha256 == server_ckpt.content_sha256
    for site in sites:
        kept = sorted((sites_dir / site / "global-model").glob("round-*.safetensors"))
        assert [p.name for p in kept] == ["round-0002.safetensors"]
        received = load_checkpoint(kept[0])
        assert received.content_sha256 == server_ckpt.content_sha256
        assert received.class_names == ("normal", "lesion") and received.run_id == RUN_ID
        # with every hospital's newest report, as the server recorded it (for the exports' sidecars)
        assert received.site_privacy == state.rounds[-1].privacy and set(received.site_privacy) == set(sites)
        # the answer left the hospital as its audit log says (same digest), charged nothing, trained nothing
        answer = [e for e in read_entries(sites_dir / site / "audit.jsonl") if e.action == "query.final_model"]
        assert [(e.sha256, e.epsilon) for e in answer] == [(final.received[site].sha256, None)]
        assert PrivacyLedger.read(sites_dir / site / "ledger.json").total_steps == 2 * 3
    assert read_server_state(tmp_path / "server_state.json") == state


def test_node_evaluation_writes_aggregates_only(sites_dir: Path, tmp_path: Path) -> None:
    # prepare: one round, so each hospital holds the final model (round 1); and another checkpoint
    from client.cli import evaluate_at_node

    fresh_state(sites_dir)
    _run(_config(sites_dir, tmp_path / "run", **{"num-server-rounds": 1}), tmp_path / "run")
    site = sites_dir / "site-0"
    other = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0001.safetensors")
    elsewhere = save_checkpoint(tmp_path / "elsewhere", 7, other.arrays, [], class_names=other.class_names or ())
    # act: the default (the final model), then --checkpoint
    code = evaluate_at_node(site, site / "cache", held_out=None, seed=0)
    default = json.loads((site / "evaluation" / "evaluation.json").read_text())
    code_other = evaluate_at_node(site, site / "cache", held_out=None, seed=0, checkpoint=elsewhere)
    chosen = json.loads((site / "evaluation" / "evaluation.json").read_text())
    # assert: aggregate numbers only; no picture (a picture would hold real images)
    written = sorted(p.name for p in (site / "evaluation").iterdir())
    assert code == code_other == 0 and written == ["evaluation.json"]
    assert default["aggregate_only"] is True and default["round"] == 1
    assert {"fd", "kid", "tstr_auc", "trtr_auc"} <= set(default)
    assert chosen["round"] == 7 and chosen["aggregate_only"] is True


def test_node_evaluation_before_any_round_says_why(tmp_path: Path) -> None:
    # prepare
    from client.cli import evaluate_at_node
    from common.config import ConfigError

    # act / assert
    with pytest.raises(ConfigError, match="no global model"):
        evaluate_at_node(tmp_path, tmp_path / "cache", held_out=None, seed=0)
