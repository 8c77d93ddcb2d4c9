"""Gradient canaries: placed where asked, charged like a patient, and out of a hospital's reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import RUN_KEYS
from common.models import build_models
from simulation.audit.canaries import GradientCanaries, place_canaries
from tests.helpers import app_model

ROOT = Path(__file__).resolve().parents[1]


def test_canaries_take_the_quietest_coordinates_in_equal_shares() -> None:
    # prepare
    _, netD = build_models(app_model(), seed=0)
    d = sum(p.numel() for p in netD.parameters())
    loudness = np.arange(d, 0, -1, dtype=float)  # the last coordinates are the quietest
    # act
    placed = place_canaries(netD, 100, sites=4, seed=0, loudness=loudness)
    # assert
    sizes = np.array([p.numel() for p in netD.parameters()])
    flat = np.concatenate([[0], np.cumsum(sizes)[:-1]])[placed.param] + placed.offset
    assert sorted(flat.tolist()) == list(range(d - 100, d))
    assert np.bincount(placed.site).tolist() == [25, 25, 25, 25]
    assert 30 < placed.included.sum() < 70  # each in with probability 1/2


def test_an_included_canary_adds_one_row_of_norm_c_when_sampled() -> None:
    # prepare: q = 1, so every included canary of the site is sampled at every step
    _, netD = build_models(app_model(), seed=0)
    placed = place_canaries(netD, 40, sites=2, seed=1)
    hooks = GradientCanaries(placed, sample_rate=1.0, norm=0.7, seed=0)
    grads = [torch.zeros_like(p) for p in netD.parameters()]
    # act
    add = hooks.canary(site=0, rnd=1)
    assert add is not None
    add(grads)
    add(grads)
    # assert: +C per step on site 0's included canaries, nothing anywhere else
    flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
    sizes = np.array([p.numel() for p in netD.parameters()])
    where = np.concatenate([[0], np.cumsum(sizes)[:-1]])[placed.param] + placed.offset
    mine = placed.included & (placed.site == 0)
    assert np.allclose(flat[where[mine]], 1.4) and np.count_nonzero(flat) == mine.sum()


def test_a_sampled_canary_moves_its_coordinate_and_scores_against_a_shadow() -> None:
    # prepare: two canaries, one in; the global model moves the in one down by 0.5
    _, netD = build_models(app_model(), seed=0)
    placed = place_canaries(netD, 2, sites=1, seed=0)
    placed = type(placed)(placed.names, placed.param, placed.offset, placed.site, np.array([True, False]))
    hooks = GradientCanaries(placed, sample_rate=1.0, norm=1.0, seed=0)
    arrays = {"d." + n: p.detach().numpy().copy() for n, p in netD.named_parameters()}
    hooks.on_global(0, arrays)
    name = "d." + placed.names[int(placed.param[0])]
    arrays[name].reshape(-1)[placed.offset[0]] -= 0.5
    # act
    hooks.on_global(1, arrays)
    # assert
    assert np.allclose(hooks.total_update(), [-0.5, 0.0])
    assert np.allclose(hooks.scores(), [0.5, 0.0])
    assert np.allclose(hooks.scores(shadow=np.array([0.1, 0.0])), [0.6, 0.0])


def test_no_run_setting_and_no_hospital_or_server_code_reaches_the_audit_hook() -> None:
    assert not any("audit" in key or "canar" in key for key in RUN_KEYS)
    for side in ("client", "server"):
        for path in (ROOT / side).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "audit_canary" not in text, path  # and tests/test_layers.py: no import of simulation/
