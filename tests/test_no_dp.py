"""A run without differential privacy (``dp.enabled = false``, ``medsynth simulate --no-dp``).

It exists for non-private references in benchmarks. The attack it must rule out: a server that
asks a deployed hospital to train without DP; the hospital refuses before it reads or charges
anything. Virtual hospitals of a simulation accept it, and then charge nothing and release the
exact class sums.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client import app as client_app
from client.audit import read_entries
from common.config import RunConfig, SiteConfig
from common.dp.warm_start import COUNT, EmbeddingSpec
from common.models import build_models
from common.protocol.messages import decode_reply, encode_train_request, error_reason
from common.weights import model_arrays
from server.rounds import ServerPaths, WarmStartRelease, run_federation
from tests.helpers import RUN_ID, default_run_config
from tests.inprocess import InProcessGrid, fresh_state, write_phantom_sites

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = {"train__local-steps": 2, "train__batch-size": 4, "model__g-width": 8, "model__d-width": 8,
         "num-server-rounds": 1, "dp__enabled": False, "warm-start__frequencies": 50,
         "warm-start__pretrain-steps": 5}


def test_a_deployed_hospital_refuses_a_run_without_dp_before_anything(
    node_config: dict[str, bool | float | str],
) -> None:
    # prepare: a deployed hospital's node config (data-dir, no partition-id); the run turns DP off
    run_config = default_run_config(**SMALL, **{"secure-aggregation": False})
    run = RunConfig.from_flower(run_config)  # type: ignore[arg-type]
    site = SiteConfig.from_flower(node_config, run)  # type: ignore[arg-type]
    netG, netD = build_models(run.model, seed=0)
    msg = Message(encode_train_request(model_arrays(netG, netD), 1), dst_node_id=7,
                  message_type=MessageType.TRAIN, group_id="1")
    ctx = Context(run_id=RUN_ID, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config=run_config)  # type: ignore[arg-type]
    # act
    reply = decode_reply(client_app.train(msg, ctx).content)
    # assert: the fixed refusal text, no update, no ledger, no cache built from the data
    assert reply.status == "error" and reply.reason == error_reason("run-refused")
    assert reply.update is None
    assert not site.ledger_path.exists()
    assert not site.cache_dir.exists()


def test_virtual_hospitals_train_without_dp_charge_nothing_and_release_exact_sums(tmp_path: Path) -> None:
    # prepare: three virtual hospitals (partition-id node configs, as the Simulation Engine gives)
    sites_dir = write_phantom_sites(tmp_path / "sites", 3)
    fresh_state(sites_dir)
    cfg = default_run_config(**SMALL, **{"sim__sites-dir": str(sites_dir), "output-dir": str(tmp_path / "out"),
                                         "wait-nodes-timeout": 5.0, "secure-aggregation": False})
    run = RunConfig.from_flower(cfg)  # type: ignore[arg-type]
    # act: round 0 (the release) and round 1
    state = run_federation(InProcessGrid(3, cfg, RUN_ID), run, ServerPaths(tmp_path / "out"), RUN_ID)
    # assert: every hospital trained and reported no budget; nothing was ever charged
    assert [r.round for r in state.rounds][-1] == 1
    last = state.rounds[-1].privacy
    assert sorted(last) == ["site-0", "site-1", "site-2"]
    assert all(p.status == "ok" and math.isinf(p.epsilon_budget) and p.noise_multiplier is None
               for p in last.values())
    for site in ("site-0", "site-1", "site-2"):
        assert not (sites_dir / site / "ledger.json").exists()
        assert all(e.epsilon in (None, 0.0) for e in read_entries(sites_dir / site / "audit.jsonl"))
    # the summed release is exact: each class's count slot is COUNT × a whole number of patients
    # (16 patients per phantom hospital, 48 in all), which no Gaussian noise would leave
    spec = EmbeddingSpec.of(run)
    total = WarmStartRelease.read(ServerPaths(tmp_path / "out").warm_start, spec.size)
    assert total is not None
    counts = total.total.reshape(spec.num_classes, spec.feature_dim + 1)[:, -1] / COUNT
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert counts.sum() == pytest.approx(48)
