"""A hospital's caps on one run (``max-epsilon-per-run``, ``max-noise-multiplier``) and the σ its
replies carry: a function of public values only, recomputed here from them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.audit import read_entries
from client.ledger import PrivacyLedger
from common.config import RunConfig
from common.dp.accounting import Charge, calibrate_noise_multiplier, epsilon_of
from common.dp.plan import fresh_hospital_line, plan_run
from common.dp.warm_start import WARM_START_ROUND, EmbeddingSpec
from common.models import build_models
from common.protocol.messages import SiteReply, decode_reply, encode_train_request, error_reason
from common.weights import model_arrays
from tests.helpers import default_run_config
from tests.inprocess import write_phantom_sites

NODE_ID = 9
BUDGET = 10.0
RUN = {"train__local-steps": 2, "train__batch-size": 4, "model__g-width": 8, "model__d-width": 8,
       "secure-aggregation": False, "warm-start__frequencies": 50, "num-server-rounds": 2}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, NODE_ID, 1
    yield


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two hospitals' DICOM folders: 4 and 16 patients."""
    small = write_phantom_sites(tmp_path_factory.mktemp("small"), 1, patients_per_site=4) / "site-0" / "dicom"
    large = write_phantom_sites(tmp_path_factory.mktemp("large"), 1, patients_per_site=16) / "site-0" / "dicom"
    return {"small": small, "large": large}


def _node(dicom: Path, state: Path, **caps: float) -> dict[str, bool | float | str]:
    return {"site-id": "site-0", "data-dir": str(dicom), "state-dir": str(state), "epsilon-budget": BUDGET,
            "allow-plain-aggregation": True, "class-names": "normal,lesion", "members": "site-0=" + "ab" * 32,
            **caps}


def _send(node: dict[str, bool | float | str], run_config: dict[str, object], server_round: int, *,
          run_id: int = 1) -> SiteReply:
    """One plain train request of ``run_config``'s run ``run_id``, answered by the ClientApp."""
    run = RunConfig.from_flower(run_config)
    netG, netD = build_models(run.model, seed=0)
    warm = None
    if run.warm_start.enabled and server_round > WARM_START_ROUND:
        warm = np.zeros(EmbeddingSpec.of(run).size)  # a summed release (its content does not matter here)
    msg = Message(encode_train_request(model_arrays(netG, netD), server_round, warm), dst_node_id=NODE_ID,
                  message_type=MessageType.TRAIN, group_id=str(server_round))
    ctx = Context(run_id=run_id, node_id=NODE_ID, node_config=node, state=RecordDict(),
                  run_config=run_config)  # type: ignore[arg-type]
    return decode_reply(client_app.train(msg, ctx).content)


def test_the_sigma_a_hospital_sends_is_recomputed_from_public_values(hospitals: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    # prepare: a warm-started run; two hospitals with the same settings and 4 and 16 patients
    config = default_run_config(**RUN, **{"warm-start__budget-share": 0.25})
    run = RunConfig.from_flower(config)  # type: ignore[arg-type]
    q, steps = run.privacy.sample_rate, run.federation.num_rounds * run.train.local_steps
    # act: round 0 (the release) and round 1 at each hospital
    replies = {}
    for name, dicom in hospitals.items():
        node = _node(dicom, tmp_path / name)
        replies[name] = (_send(node, config, WARM_START_ROUND), _send(node, config, 1))
    # assert: independently of the code under test, from public values only: the release takes a
    # quarter of the budget at q = 1; training then ends the run at the budget on top of it
    release_sigma = calibrate_noise_multiplier([], sample_rate=1.0, planned_steps=1, delta=1e-5,
                                               budget=0.25 * BUDGET)
    train_sigma = calibrate_noise_multiplier([Charge(release_sigma, 1.0, 1)], sample_rate=q, planned_steps=steps,
                                             delta=1e-5, budget=BUDGET)
    for release, trained in replies.values():
        assert release.status == trained.status == "ok", (release.reason, trained.reason)
        assert release.noise_multiplier == pytest.approx(release_sigma, rel=1e-12)
        assert trained.noise_multiplier == pytest.approx(train_sigma, rel=1e-12)
    small, large = replies["small"][1], replies["large"][1]  # 4 and 16 patients: identical public figures
    assert (small.noise_multiplier, small.epsilon, small.total_steps) == (
        large.noise_multiplier, large.epsilon, large.total_steps)
    # what `medsynth server start` prints for a fresh hospital is the same plan
    plan = plan_run(run, budget=BUDGET, delta=1e-5, accountant="prv")
    assert (plan.release_sigma, plan.sigma) == pytest.approx((release_sigma, train_sigma), rel=1e-12)
    assert f"σ = {train_sigma:.3g}" in fresh_hospital_line(run)
    # the audit log keeps the σ that left with each reply
    audited = read_entries(tmp_path / "small" / "audit.jsonl")
    assert [e.noise_multiplier for e in audited] == [replies["small"][0].noise_multiplier,
                                                     replies["small"][1].noise_multiplier]


def test_one_run_adds_at_most_max_epsilon_per_run(hospitals: dict[str, Path], tmp_path: Path) -> None:
    # prepare: a hospital that lets one run add at most ε = 2 of its 10
    config = default_run_config(**RUN, **{"warm-start__budget-share": 0.25})
    node = _node(hospitals["small"], tmp_path, **{"max-epsilon-per-run": 2.0})
    ledger_path = tmp_path / "ledger.json"
    # act: a whole run (release and two rounds), then the first rounds of a second run
    first = [_send(node, config, r) for r in (0, 1, 2)]
    after_first = PrivacyLedger.read(ledger_path).epsilon()
    second = [_send(node, config, r, run_id=2) for r in (0, 1)]
    # assert: the first run calibrated to its cap and ended there, not at the budget; the second
    # run starts from what the first spent and gets its own cap on top
    assert [r.status for r in first + second] == ["ok"] * 5, [r.reason for r in first + second]
    assert 1.95 <= after_first <= 2.0
    assert first[1].noise_multiplier is not None and first[1].noise_multiplier > 1.0  # more noise than at ε = 10
    entries = PrivacyLedger.read(ledger_path).entries
    second_run = [e.charge for e in entries if e.run == 2]
    whole_second = [*[e.charge for e in entries if e.run == 1], *second_run[:1],
                    Charge(second_run[1].noise_multiplier, second_run[1].sample_rate, 4)]
    assert after_first + 1.9 <= epsilon_of(whole_second, 1e-5) <= after_first + 2.0


def test_a_run_that_would_train_on_noise_is_refused_before_anything_is_charged(hospitals: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    # prepare: a hospital that trains at σ ≤ 1, and a run whose calibration needs more (ε = 0.5
    # left for 4 steps); a second hospital with a run at a fixed σ = 3
    calibrated = default_run_config(**RUN, **{"warm-start__budget-share": 0.0})
    node = _node(hospitals["small"], tmp_path / "a", **{"max-noise-multiplier": 1.0, "max-epsilon-per-run": 0.5})
    fixed = default_run_config(**RUN, **{"warm-start__budget-share": 0.0, "dp__calibrate": False,
                                         "dp__noise-multiplier": 3.0})
    fixed_node = _node(hospitals["small"], tmp_path / "b", **{"max-noise-multiplier": 2.0})
    # act
    refused = _send(node, calibrated, 1)
    refused_fixed = _send(fixed_node, fixed, 1)
    # assert: a fixed error text for the server; the hospital's audit log names σ and the key;
    # no charge, and no plan kept (a raised cap takes effect at the next request)
    for reply, state in ((refused, tmp_path / "a"), (refused_fixed, tmp_path / "b")):
        assert reply.status == "error" and reply.reason == error_reason("noise-refused")
        assert reply.noise_multiplier is None
        (entry,) = read_entries(state / "audit.jsonl")
        assert "max-noise-multiplier" in entry.detail and "NoiseRefused" in entry.detail
        ledger = state / "ledger.json"
        assert not ledger.exists() or (PrivacyLedger.read(ledger).entries == [] and
                                       PrivacyLedger.read(ledger).plan(1) is None)
    assert "σ = 3 (the run's fixed dp.noise-multiplier)" in read_entries(tmp_path / "b" / "audit.jsonl")[0].detail
    # the same run trains once the hospital accepts that σ
    allowed = _send({**node, "max-noise-multiplier": 50.0}, calibrated, 1)
    assert allowed.status == "ok" and allowed.noise_multiplier is not None and allowed.noise_multiplier > 1.0
