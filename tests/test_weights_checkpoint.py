"""Update vectors sum to FedAvg; checkpoints are atomic, verified and pickle-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from common.models import build_models
from common.round_record import RoundRecord
from common.weights import UpdateLayout, fedavg, model_arrays, sum_vectors
from tests.helpers import app_model


def test_summed_vectors_give_the_weighted_average() -> None:
    # prepare: three hospitals' local models around a global one
    rng = np.random.default_rng(0)
    glob = {"g.w": rng.normal(size=(3, 4)).astype(np.float32), "d.b": rng.normal(size=5).astype(np.float32),
            "g.n": np.array(7, np.int64)}
    locals_ = [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                for k, v in glob.items()} for _ in range(3)]
    weights, losses = [10.0, 30.0, 60.0], [1.0, 2.0, 3.0]
    layout = UpdateLayout.of(glob)
    # act
    vectors = [layout.pack(lo, glob, w, {"loss_d_fake": loss, "loss_g": 0.5}) for lo, w, loss in
               zip(locals_, weights, losses, strict=True)]
    new, metrics = fedavg(glob, layout, sum_vectors(vectors))
    # assert
    for k in ("g.w", "d.b"):
        expected = sum(w * lo[k].astype(np.float64) for w, lo in zip(weights, locals_, strict=True)) / 100
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)
    assert new["g.n"] == 7
    assert metrics["loss_d_fake"] == pytest.approx(2.5)
    assert layout.names == ("d.b", "g.w")


def _round(i: int) -> RoundRecord:
    """The smallest valid round record: round ``i``, nobody trained."""
    return RoundRecord(round=i, sites_trained=(), sites_budget_exhausted=(), failures=(), privacy={}, seconds=0.0)


def test_resume_picks_the_last_good_checkpoint(tmp_path: Path) -> None:
    # prepare: rounds 1..3, then round 3 torn and a stray temp file
    g, d = build_models(app_model(), seed=0)
    arrays = model_arrays(g, d)
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, {k: v + r if v.dtype.kind == "f" else v for k, v in arrays.items()},
                        [_round(i) for i in range(1, r + 1)])
    third = tmp_path / "round-0003.safetensors"
    third.write_bytes(third.read_bytes()[: third.stat().st_size // 2])
    (tmp_path / ".round-0004.safetensors.tmp-1").write_bytes(b"half")
    # act
    ckpt = latest_valid_checkpoint(tmp_path)
    # assert
    assert ckpt is not None and ckpt.round == 2
    assert ckpt.history == (_round(1), _round(2))
    np.testing.assert_array_equal(ckpt.arrays["g.project.weight"], arrays["g.project.weight"] + 2)


def test_altered_checkpoint_fails_its_hash(tmp_path: Path) -> None:
    g, d = build_models(app_model(), seed=0)
    path = save_checkpoint(tmp_path, 1, model_arrays(g, d), [])
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF  # flip a byte of tensor data
    path.write_bytes(bytes(blob))
    assert latest_valid_checkpoint(tmp_path) is None


def test_adam_step_bound_holds_for_adversarial_gradients() -> None:
    # prepare: gradient sequences built to push Adam's |m̂/√v̂| up (one spike after tiny ones,
    # constant sign, alternating sign, heavy-tailed noise)
    import torch

    from common.weights import adam_step_bound

    rng = np.random.default_rng(0)
    steps = 60
    sequences = [
        np.r_[np.full(steps - 1, 1e-6), 1e3],
        np.ones(steps),
        np.tile([1.0, -1.0], steps // 2),
        rng.standard_cauchy(steps),
        np.r_[1e3, np.full(steps - 1, 1e-9)],
    ]
    bound = adam_step_bound(0.5, 0.999, steps)
    for grads in sequences:
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([p], lr=1.0, betas=(0.5, 0.999), eps=0.0)
        worst = 0.0
        # act
        for g in grads:
            before = float(p.detach())
            p.grad = torch.tensor([float(g)])
            opt.step()
            worst = max(worst, abs(float(p.detach()) - before))
        # assert: every single step is within the bound, so steps·lr·bound bounds the round
        assert worst <= bound * (1 + 1e-6)
    assert adam_step_bound(0.5, 0.999, 50) == pytest.approx(4.0336, abs=1e-3)  # the default round


def test_checkpoint_metadata_names_classes_and_run(tmp_path: Path) -> None:
    # prepare
    arrays = {"g.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    # act
    with_meta = load_checkpoint(save_checkpoint(tmp_path / "a", 3, arrays, [], class_names=["normal", "pneumonia"],
                                                run_id=77))
    without = load_checkpoint(save_checkpoint(tmp_path / "b", 3, arrays, []))
    # assert
    assert with_meta.class_names == ("normal", "pneumonia") and with_meta.run_id == 77
    assert without.class_names is None and without.run_id is None
    assert with_meta.content_sha256 == without.content_sha256  # metadata is not model content
