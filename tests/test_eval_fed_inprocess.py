"""The benchmark's in-process federation: production privacy arithmetic, output the evaluation can read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.checkpoint import load_checkpoint, save_checkpoint
from common.checkpoint_model import load_generator
from common.config import run_config
from common.models import build_models
from common.round_record import Initialisation
from common.weights import model_arrays
from simulation.fed_inprocess import FedPlan, train_federated
from tests.helpers import toy_dataset

RUN = run_config({"model.g-width": 8, "model.d-width": 8, "model.latent-dim": 8, "train.local-steps": 3,
                  "train.batch-size": 4, "train.device": "cpu", "num-server-rounds": 2,
                  "warm-start.budget-share": 0.0})
MODEL = RUN.model


@pytest.mark.parametrize("epsilon", [2.0, None])
def test_rounds_end_at_the_budget_and_leave_a_loadable_checkpoint(tmp_path: Path, epsilon: float | None) -> None:
    # prepare: two sites of 20 and 30 patients
    sites = [toy_dataset(num_patients=20, per_patient=1, seed=0), toy_dataset(num_patients=30, per_patient=1, seed=1)]
    plan = FedPlan.from_run(RUN, epsilon)
    # act
    state = train_federated(sites, plan, tmp_path, say=lambda _: None)
    generator = load_generator(tmp_path)
    # assert
    assert [r.round for r in state.rounds] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["round-0001.png", "round-0002.png"]
    assert generator.provenance.round == 2 and generator.cfg == MODEL
    last = state.rounds[-1].privacy
    if epsilon is None:
        assert all(p.epsilon == 0.0 for p in last.values())
    else:  # calibrated to end at, never above, the budget
        assert all(epsilon - 0.05 < p.epsilon <= epsilon for p in last.values())
        assert generator.provenance.sites["site-0"].epsilon == last["site-0"].epsilon


def test_a_plan_with_a_public_checkpoint_records_it_in_checkpoints_and_state(tmp_path: Path) -> None:
    # prepare: a public checkpoint of the run's model, and a one-round plan that starts from it
    netG, netD = build_models(MODEL, seed=7)
    public = save_checkpoint(tmp_path / "public", 5, model_arrays(netG, netD), ())
    plan = replace(FedPlan.from_run(RUN, None), rounds=1, init_from=public)
    sites = [toy_dataset(num_patients=20, per_patient=1, seed=0)]
    # act
    state = train_federated(sites, plan, tmp_path / "run", say=lambda _: None)
    # assert
    expected = Initialisation.public(load_checkpoint(public).content_sha256, "round-0005.safetensors")
    assert state.initialisation == expected
    assert load_generator(tmp_path / "run").provenance.initialisation == expected
