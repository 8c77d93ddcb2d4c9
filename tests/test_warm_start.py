"""The warm-start release (``common.dp.embedding``): its sensitivity, its ε, its round at a hospital.

What each test rules out:
* a patient moving the released sum by more than 1 (the Gaussian mechanism's σ would be too small);
* ε of the release that differs from an independent recomputation (the analytic Gaussian
  mechanism of Balle & Wang, ICML 2018, which is exact for one release);
* a release that is not charged, charged after the data is read, or charged at the wrong (σ, q);
* a run that mixes the release with DP-SGD and ends above the hospital's budget;
* a G that the summed release cannot pull towards the classes' means (the warm start does nothing);
* a secure sum of releases that differs from the plain sum.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from scipy.stats import norm

from client import app as client_app
from client.ledger import PrivacyLedger
from common.config import RunConfig, SiteConfig, run_config
from common.dp.accounting import Charge, calibrate_noise_multiplier, epsilon_of
from common.dp.embedding import (
    Anchor,
    ClassTargets,
    FeatureMap,
    embedding_loss,
    patient_sum,
    pretrain_generator,
)
from common.dp.plan import release_noise_multiplier
from common.dp.warm_start import WARM_START_ROUND, EmbeddingSpec
from common.models import build_models
from common.protocol.messages import SiteReply, decode_reply, encode_train_request, error_reason
from common.protocol.secagg import quantizer_for
from common.weights import UpdateLayout, model_arrays
from tests.helpers import RUN_ID, default_run_config

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = EmbeddingSpec(image_size=32, num_classes=2, frequencies=50, seed=3)


def _analytic_gaussian_delta(eps: float, sigma: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity 1 and noise σ (Balle & Wang 2018, Thm. 8)."""
    return float(norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma))


def test_one_patient_moves_the_release_by_at_most_one() -> None:
    # prepare: worst-case images (saturated ±1, a checkerboard) and patients with 1 to 3 images
    rng = np.random.default_rng(0)
    images = rng.choice([-1.0, 1.0], size=(40, 1, 32, 32)).astype(np.float32)
    images[:4] = 1.0
    images[4:8] = -1.0
    labels = rng.integers(0, 2, 40)
    patients = np.repeat(np.arange(20), 2)
    full = patient_sum(SPEC, images, labels, patients)
    # act / assert: removing any one patient changes the sum by ≤ 1 in ℓ2 (≈ 1 for saturated ones)
    shifts = []
    for p in range(20):
        keep = patients != p
        shifts.append(np.linalg.norm(full - patient_sum(SPEC, images[keep], labels[keep], patients[keep])))
    assert max(shifts) <= 1.0 + 1e-9
    assert max(shifts) > 0.9  # the bound is nearly attained: the scales are not wastefully small


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact ε at ``delta``: bisection on the decreasing δ(ε) above."""
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _analytic_gaussian_delta(mid, sigma) > delta else (lo, mid)
    return hi


def test_release_epsilon_matches_the_analytic_gaussian_mechanism() -> None:
    for sigma in (2.0, 5.0, 17.0):
        # act: ε of one release at σ from the ledger's accountant (PRV), at δ = 1e-5
        eps = epsilon_of([Charge(sigma, 1.0, 1)], 1e-5)
        # assert: never below the exact ε, and above it by at most PRV's discretisation error
        exact = _analytic_gaussian_epsilon(sigma, 1e-5)
        assert exact <= eps <= exact + 0.02, (sigma, exact, eps)


def test_the_release_takes_its_share_and_the_run_still_ends_at_the_budget() -> None:
    # act: σ of a 20 % release on a fresh ledger, then DP-SGD calibrated on top of it
    sigma = release_noise_multiplier([], budget=10.0, share=0.2, delta=1e-5, accountant="prv")
    release = Charge(sigma, 1.0, 1)
    sgd = calibrate_noise_multiplier([release], sample_rate=0.11, planned_steps=500, delta=1e-5, budget=10.0)
    # assert
    assert 1.98 <= epsilon_of([release], 1e-5) <= 2.0
    assert 9.9 <= epsilon_of([release, Charge(sgd, 0.11, 500)], 1e-5) <= 10.0
    # a ledger that already spent some gives the release 20 % of what remains
    spent = [Charge(2.0, 0.11, 200)]
    before = epsilon_of(spent, 1e-5)
    sigma2 = release_noise_multiplier(spent, budget=10.0, share=0.2, delta=1e-5, accountant="prv")
    after = epsilon_of([*spent, Charge(sigma2, 1.0, 1)], 1e-5)
    assert before + 0.19 * (10 - before) <= after <= before + 0.2 * (10 - before) + 1e-9


def test_targets_at_sigma_zero_are_each_classes_mean_features_and_patient_count() -> None:
    # prepare: 6 patients of one image each, 2 of class 0 and 4 of class 1
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(6, 1, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1, 1])
    # act
    targets = ClassTargets.from_sum(SPEC, patient_sum(SPEC, images, labels, np.arange(6)))
    # assert
    feats = FeatureMap(SPEC)(torch.from_numpy(images)).double()
    assert targets.counts.tolist() == pytest.approx([2.0, 4.0])
    for k in (0, 1):
        assert torch.allclose(targets.means[k].double(), feats[torch.from_numpy(labels == k)].mean(0), atol=1e-5)


def test_pretraining_pulls_the_generator_to_the_released_class_means() -> None:
    # prepare: targets from two visibly different classes (dark vs bright images)
    rng = np.random.default_rng(2)
    images = np.concatenate([np.full((8, 1, 32, 32), -0.8), np.full((8, 1, 32, 32), 0.6)]).astype(np.float32)
    images += rng.normal(0, 0.05, images.shape).astype(np.float32)
    labels = np.repeat([0, 1], 8)
    targets = ClassTargets.from_sum(SPEC, patient_sum(SPEC, images, labels, np.arange(16)))
    model = run_config({"model.g-width": 8}).model
    netG, _ = build_models(model, seed=0)
    anchor = Anchor(FeatureMap(SPEC), targets, 1.0)
    z, y = torch.randn(64, model.latent_dim), torch.arange(64) % 2
    with torch.no_grad():
        before = float(embedding_loss(anchor.phi, netG(z, y), y, targets))
    # act
    pretrain_generator(netG, anchor, latent_dim=model.latent_dim, num_classes=2, steps=800, batch_size=32,
                       lr=2e-3, beta1=0.5, seed=0, device=torch.device("cpu"))
    # assert: the loss fell tenfold, and each class's mean brightness is on the right side
    with torch.no_grad():
        fake = netG(z, y)
        after = float(embedding_loss(anchor.phi, fake, y, targets))
    assert after < 0.1 * before
    assert float(fake[y == 0].mean()) < -0.3 and float(fake[y == 1].mean()) > 0.3


def test_the_secure_sum_of_releases_equals_their_plain_sum() -> None:
    # prepare: three hospitals' padded releases in round 0's layout
    run = run_config({"warm-start.budget-share": 0.2, "warm-start.frequencies": 50})
    netG, netD = build_models(run.model, seed=0)
    layout = UpdateLayout.of(model_arrays(netG, netD))
    size = EmbeddingSpec.of(run).size
    rng = np.random.default_rng(3)
    vectors = []
    for _ in range(3):
        v = np.zeros(layout.size)
        v[:size] = rng.normal(0, 50, size) + rng.uniform(0, 900, size)
        vectors.append(v)
    q = quantizer_for(run, layout, WARM_START_ROUND)
    # act: the ring sum of the encodings, decoded
    ring = np.zeros(layout.size, dtype=np.uint64)
    for v in vectors:
        ring += q.encode(v)
    total = q.decode_sum(ring, 3)
    # assert
    np.testing.assert_allclose(total, np.sum(vectors, axis=0), atol=1e-6)


# ---- a hospital's round 0 through its ClientApp ---------------------------------------------

NODE_ID = 7
RUN_CONFIG = default_run_config(**{
    "train__local-steps": 2, "train__batch-size": 4, "model__g-width": 8, "model__d-width": 8,
    "secure-aggregation": False, "warm-start__budget-share": 0.25, "warm-start__frequencies": 50,
    "num-server-rounds": 2,
})


def _send(node_config: dict[str, bool | float | str], server_round: int,
          warm_start: np.ndarray | None = None) -> SiteReply:
    run = RunConfig.from_flower(RUN_CONFIG)  # type: ignore[arg-type]
    netG, netD = build_models(run.model, seed=0)
    msg = Message(encode_train_request(model_arrays(netG, netD), server_round, warm_start), dst_node_id=NODE_ID,
                  message_type=MessageType.TRAIN, group_id=str(server_round))
    ctx = Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node_config, state=RecordDict(),
                  run_config=RUN_CONFIG)  # type: ignore[arg-type]
    return decode_reply(client_app.train(msg, ctx).content)


def test_round_zero_charges_one_gaussian_release_then_training_is_calibrated_on_top(
    node_config: dict[str, bool | float | str],
) -> None:
    run = RunConfig.from_flower(RUN_CONFIG)  # type: ignore[arg-type]
    site = SiteConfig.from_flower(node_config, run)  # type: ignore[arg-type]
    size = EmbeddingSpec.of(run).size
    # act: round 0, then round 1 with the (here: this hospital's own) release as the summed one
    release = _send(node_config, WARM_START_ROUND)
    assert release.status == "ok" and release.update is not None
    first = PrivacyLedger.read(site.ledger_path).entries
    trained = _send(node_config, 1, warm_start=release.update[:size])
    # assert: one charge at q = 1 in round 0, worth a quarter of the budget; the release in front,
    # zeros behind; round 1 charged at the run's q with σ calibrated to end the 2 rounds at 10
    assert len(first) == 1 and (first[0].round, first[0].sample_rate, first[0].steps) == (0, 1.0, 1)
    assert 2.45 <= release.epsilon <= 2.5
    assert np.count_nonzero(release.update[size:]) == 0 and np.count_nonzero(release.update[:size]) > size // 2
    entries = PrivacyLedger.read(site.ledger_path).entries
    assert trained.status == "ok", trained.reason
    assert [e.round for e in entries] == [0, 1] and entries[1].sample_rate == run.privacy.sample_rate
    two_rounds = [entries[0].charge, Charge(entries[1].noise_multiplier, entries[1].sample_rate, 4)]
    assert 9.9 <= epsilon_of(two_rounds, 1e-5) <= 10.0


def test_a_warm_started_round_without_the_summed_release_is_refused_before_any_charge(
    node_config: dict[str, bool | float | str],
) -> None:
    run = RunConfig.from_flower(RUN_CONFIG)  # type: ignore[arg-type]
    site = SiteConfig.from_flower(node_config, run)  # type: ignore[arg-type]
    # act
    missing = _send(node_config, 1)
    wrong = _send(node_config, 1, warm_start=np.full(7, 1.0))
    # assert
    assert missing.status == wrong.status == "error"
    assert missing.reason == wrong.reason == error_reason("model-refused")
    assert not site.ledger_path.exists()


def test_the_server_keeps_the_summed_release_for_a_resumed_run(tmp_path: Path) -> None:
    from common.round_record import RecordError
    from server.rounds import WarmStartRelease

    # prepare
    total = np.arange(2 * (64 + 2 * 50 + 1), dtype=np.float64) * 0.5
    path = tmp_path / "warm_start.json"
    # act
    WarmStartRelease(run_id=7, total=total).write(path)
    back = WarmStartRelease.read(path, total.size)
    # assert: the same values come back; a file of another size is refused, an absent one is None
    assert back is not None and back.run_id == 7
    np.testing.assert_array_equal(back.total, total)
    with pytest.raises(RecordError, match="not a warm-start release"):
        WarmStartRelease.read(path, total.size + 1)
    assert WarmStartRelease.read(tmp_path / "absent.json", total.size) is None


def test_the_server_app_does_not_load_opacus() -> None:
    # Opacus configures the root logger when imported; in the ServerApp process that silenced the
    # round lines the server daemon waits for. The warm start's server side must not pull it in.
    import subprocess
    import sys

    code = "import sys, server.app, server.rounds; sys.exit(1 if 'opacus' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_pair_patient_moves_the_release_by_at_most_one_and_its_mask_counts() -> None:
    # prepare: image–mask pairs (2 channels), saturated worst cases, the spec a pair run derives
    spec = EmbeddingSpec.of(run_config({"model.pairs": True, "model.image-size": 32, "warm-start.frequencies": 50}))
    rng = np.random.default_rng(1)
    rows = rng.choice([-1.0, 1.0], size=(20, 2, 32, 32)).astype(np.float32)  # (N, 2, S, S): image, mask
    rows[:2] = 1.0
    labels, patients = rng.integers(0, spec.num_classes, 20), np.arange(20)
    full = patient_sum(spec, rows, labels, patients)
    # act: remove each patient; flip one patient's mask only
    shifts = [np.linalg.norm(full - patient_sum(spec, rows[patients != p], labels[patients != p],
                                                patients[patients != p])) for p in range(20)]
    other_mask = rows.copy()
    other_mask[0, 1] *= -1.0
    # assert: sensitivity ≤ 1 with both channels; the release has the pair's size; the mask moves it
    assert spec.channels == 2 and full.shape == (spec.num_classes * (2 * 64 + 2 * 50 + 1),)
    assert max(shifts) <= 1.0 + 1e-9
    assert np.linalg.norm(full - patient_sum(spec, other_mask, labels, patients)) > 0.1
