"""DP-SGD on the discriminator: the per-patient sensitivity bound and G-step hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator

from common.dp.train import (
    DIVERSITY_CAP,
    PatientSampler,
    discriminator_loss,
    diversity_term,
    generator_step,
    make_private_discriminator,
    sample_noise,
    train_local_round,
)
from common.models import build_models
from tests.helpers import app_model, app_train, toy_dataset

CPU = torch.device("cpu")


def _summed_clipped_grad(netD, cfg, train, real, y_real, fake, y_fake, clip) -> torch.Tensor:
    """Σ_rows clip(g_row) as the real DPOptimizer computes it, with σ = 0 (no noise)."""
    priv = make_private_discriminator(
        netD, train=train, noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5,
    )
    try:
        loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, cfg.conditional)
        priv.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        priv.optimizer.pre_step()  # clip, accumulate, add (zero) noise, divide by the public 2·B
        expected_rows = 2 * train.batch_size
        return torch.cat([p.grad.flatten() for p in priv.module.parameters()]) * expected_rows
    finally:
        priv.module._close()


@pytest.mark.parametrize(("conditional", "pairs"), [(True, False), (False, False), (True, True)])
def test_one_patients_contribution_is_at_most_the_clipping_norm(conditional: bool, pairs: bool) -> None:
    # prepare: a batch with and without one patient whose gradient is huge (clip binds); in pair
    # mode the outlier is the patient's mask, which leaves the hospital only through this bound
    cfg = app_model(conditional=conditional, pairs=pairs)
    train = app_train(batch_size=8)
    clip = 0.7
    _, netD = build_models(cfg, seed=1)
    gen = torch.Generator().manual_seed(2)
    real = torch.rand(8, cfg.channels, 32, 32, generator=gen) * 2 - 1
    real[0, -1] *= 50.0  # an outlier patient (its image, or its mask in pair mode)
    y_real = torch.tensor([0, 1] * 4)
    fake = torch.rand(8, cfg.channels, 32, 32, generator=gen) * 2 - 1
    y_fake = torch.tensor([1, 0] * 4)
    # act
    with_patient = _summed_clipped_grad(netD, cfg, train, real, y_real, fake, y_fake, clip)
    without = _summed_clipped_grad(netD, cfg, train, real[1:], y_real[1:], fake, y_fake, clip)
    # assert: removing the patient moves the summed clipped gradient by at most C
    diff = float((with_patient - without).norm())
    assert 0.5 * clip < diff <= clip * (1 + 1e-4)


def test_every_row_is_clipped_separately() -> None:
    # prepare: all-real and all-fake rows large, so every row's norm is cut to C
    cfg = app_model(conditional=False)
    train = app_train(batch_size=4)
    _, netD = build_models(cfg, seed=3)
    real = torch.full((4, 1, 32, 32), 30.0)
    fake = torch.full((4, 1, 32, 32), -30.0)
    y = torch.zeros(4, dtype=torch.long)
    # act
    total = _summed_clipped_grad(netD, cfg, train, real, y, fake, y, clip=1.0)
    # assert: the sum of 8 clipped rows has norm ≤ 8·C (and the bound is per row, not per pair)
    assert float(total.norm()) <= 8 * 1.0 * (1 + 1e-4)


def test_each_rows_per_sample_gradient_is_that_rows_own_gradient() -> None:
    # prepare: a conditional D with its class head; 3 real rows and 2 fake rows
    cfg = app_model()
    _, netD = build_models(cfg, seed=5)
    gen = torch.Generator().manual_seed(6)
    real, y_real = torch.rand(3, 1, 32, 32, generator=gen) * 2 - 1, torch.tensor([0, 1, 0])
    fake, y_fake = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1, torch.tensor([1, 1])
    priv = make_private_discriminator(netD, train=app_train(batch_size=4), noise_multiplier=0.0,
                                      max_grad_norm=1.0, sample_rate=0.5)
    try:
        # act: the production forward and backward over all 5 rows
        priv.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, cfg.conditional)
        loss.backward()
        per_row = [p.grad_sample.detach().clone() for p in netD.parameters()]  # each (5, *p.shape)
    finally:
        priv.module._close()
    # assert: row i's gradient equals plain autograd's gradient of row i's loss alone (D unwrapped)
    rows = [(real[i : i + 1], y_real[i : i + 1], fake[:0], y_fake[:0]) for i in range(3)]
    rows += [(real[:0], y_real[:0], fake[j : j + 1], y_fake[j : j + 1]) for j in range(2)]
    for i, (r, yr, f, yf) in enumerate(rows):
        netD.zero_grad(set_to_none=True)
        alone, _, _ = discriminator_loss(netD, r, yr, f, yf, cfg.conditional)
        alone.backward()
        for p, g in zip(netD.parameters(), per_row, strict=True):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6)


def test_discriminator_passes_opacus_validator() -> None:
    for size in (32, 64):
        _, netD = build_models(app_model(image_size=size))
        assert ModuleValidator.validate(netD, strict=False) == []
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in netD.modules())


def test_generator_step_leaves_no_per_sample_gradients_and_no_accountant_step() -> None:
    # prepare: a private D after one real D step
    cfg = app_model()
    train = app_train(batch_size=4)
    netG, netD = build_models(cfg, seed=0)
    priv = make_private_discriminator(
        netD, train=train, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1
    )
    z, y = sample_noise(4, cfg, CPU)
    loss, _, _ = discriminator_loss(priv.module, torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 0]),
                                 netG(z, y).detach(), y, True)
    loss.backward()
    priv.optimizer.step()
    history_before = list(priv.accountant.history)
    d_before = [p.detach().clone() for p in netD.parameters()]
    g_before = [p.detach().clone() for p in netG.parameters()]
    optG = torch.optim.Adam(netG.parameters(), lr=1e-3)
    # act
    generator_step(netG, netD, optG, priv.optimizer, cfg, 4, CPU)
    # assert
    assert priv.accountant.history == history_before == [(1.0, 0.1, 1)]
    for p in netD.parameters():
        assert getattr(p, "grad_sample", None) is None
        assert p.grad is None
    assert all(torch.equal(a, b) for a, b in zip(d_before, netD.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, netG.parameters(), strict=True))
    priv.module._close()


def test_poisson_sampler_takes_at_most_one_image_per_patient_at_rate_q() -> None:
    # prepare: 200 patients with 1..5 images each
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(200), rng.integers(1, 6, 200))
    sampler = PatientSampler(patients, sample_rate=0.25, seed=4)
    # act
    batches = [sampler.sample() for _ in range(400)]
    # assert
    for idx in batches:
        assert len(set(patients[idx].tolist())) == idx.size
    mean = np.mean([b.size for b in batches])
    assert abs(mean - 50) < 2.5  # E[b] = qP = 50; sd of the mean ≈ 0.3


def test_local_round_counts_exactly_the_configured_steps() -> None:
    # prepare
    data = toy_dataset()
    cfg = app_model()
    train = app_train(local_steps=6, batch_size=8, d_steps_per_g=2)
    netG, netD = build_models(cfg, seed=0)
    # act
    result = train_local_round(netG, netD, data, model=cfg, train=train, sample_rate=0.2, noise_multiplier=1.3,
                               max_grad_norm=1.0, device=CPU)
    # assert
    assert result.charge is not None
    assert (result.charge.noise_multiplier, result.charge.sample_rate, result.charge.steps) == (1.3, 0.2, 6)
    assert result.g_steps == 3
    assert np.isfinite(result.loss_d) and np.isfinite(result.loss_d_fake) and np.isfinite(result.loss_g)
    assert not hasattr(next(netD.parameters()), "grad_sample") or next(netD.parameters()).grad_sample is None


def test_sites_of_any_size_are_charged_the_public_sample_rate() -> None:
    # prepare: 5 and 40 patients, batch 8 (q = B / P would be 1 and 0.2: the charge would reveal P)
    small, large = toy_dataset(num_patients=5), toy_dataset(num_patients=40)
    train = app_train(batch_size=8, local_steps=2)
    # act
    charges = []
    for data in (small, large):
        netG, netD = build_models(app_model())
        result = train_local_round(netG, netD, data, model=app_model(), train=train, sample_rate=0.3,
                                   noise_multiplier=1.0, max_grad_norm=1.0, device=CPU)
        charges.append(result.charge)
    # assert: the accountant counted the public q at both, which is what their ledgers charge
    assert charges[0] == charges[1]
    assert charges[0] is not None and (charges[0].sample_rate, charges[0].steps) == (0.3, 2)


def test_fake_rows_loss_does_not_depend_on_real_rows() -> None:
    # prepare: one D, the same fake rows, two different sets of real rows (and counts)
    cfg = app_model()
    _, netD = build_models(cfg, seed=3)
    gen = torch.Generator().manual_seed(6)
    fake, y_fake = torch.rand(4, 1, 32, 32, generator=gen), torch.tensor([0, 1, 0, 1])
    real_a, y_a = torch.rand(3, 1, 32, 32, generator=gen), torch.tensor([0, 1, 1])
    real_b, y_b = torch.rand(7, 1, 32, 32, generator=gen) * 5, torch.tensor([1] * 7)
    # act
    _, _, fake_a = discriminator_loss(netD, real_a, y_a, fake, y_fake, True)
    _, _, fake_b = discriminator_loss(netD, real_b, y_b, fake, y_fake, True)
    # assert: what may leave (the fake-rows loss) is the same whatever the real rows were
    with torch.no_grad():
        logits, _ = netD(fake, y_fake)
    by_hand = float(F.binary_cross_entropy_with_logits(logits, torch.zeros(4)))
    assert fake_a == pytest.approx(by_hand, rel=1e-5) and fake_b == pytest.approx(by_hand, rel=1e-5)


def test_class_head_learns_from_real_rows_only() -> None:
    # prepare: an AC-GAN discriminator and a batch of 3 real and 2 fake rows
    cfg = app_model(aux_classifier=True)
    _, netD = build_models(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    real, fake = torch.rand(3, 1, 32, 32, generator=gen), torch.rand(2, 1, 32, 32, generator=gen)
    y_real, y_fake = torch.tensor([0, 1, 1]), torch.tensor([1, 0])
    # act
    loss, rows, _ = discriminator_loss(netD, real, y_real, fake, y_fake, True)
    # assert: Σ BCE over all rows + Σ CE over the real rows, by hand
    logits, class_logits = netD(torch.cat([real, fake]), torch.cat([y_real, y_fake]))
    assert class_logits is not None and class_logits.shape == (5, 2)
    target = torch.tensor([1.0, 1, 1, 0, 0])
    by_hand = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") + F.cross_entropy(
        class_logits[:3], y_real, reduction="sum")
    assert rows == 5 and float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)


def test_diversity_term_is_zero_for_a_collapsed_generator_and_capped() -> None:
    # prepare
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(8, 16, generator=gen)
    same = torch.rand(1, 1, 32, 32, generator=gen).expand(8, 1, 32, 32)  # one image for every latent
    spread = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1
    # act
    collapsed, varied, huge = diversity_term(same, z), diversity_term(spread, z), diversity_term(spread * 100, z)
    # assert: pairs (i, i+4); collapse scores 0, spread scores > 0, never above the cap
    d_img = (spread[:4] - spread[4:]).abs().flatten(1).mean(1)
    d_z = (z[:4] - z[4:]).abs().mean(1)
    assert float(collapsed) == 0.0
    assert float(varied) == pytest.approx(float((d_img / d_z).clamp(max=DIVERSITY_CAP).mean()), rel=1e-6)
    assert float(huge) == pytest.approx(DIVERSITY_CAP)
