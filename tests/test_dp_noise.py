"""DP noise from ChaCha20: the keystream, the Box–Muller transform, and the optimizer that uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from common.dp.accounting import Charge
from common.dp.noise import ChaCha20Gaussian, words_to_normals
from common.dp.train import discriminator_loss, make_private_discriminator
from common.models import build_models
from common.secagg.primitives import prg_words
from tests.helpers import app_model, app_train

ALPHA = 0.001  # fixed significance of the normality test (the draws are seeded: no flakiness)
DRAWS = 200_000
R_MAX = math.sqrt(256 * math.log(2))  # √(−2 ln 2⁻¹²⁸): the largest radius the sampler can output
# RFC 8439 Appendix A.1, test vector #1: ChaCha20 block of the all-zero key, nonce and counter
RFC8439_ZERO_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def test_the_words_are_the_rfc_8439_keystream_read_on_without_reuse() -> None:
    # prepare
    key = bytes(range(32))
    # act: two reads from one stream, one read from a fresh stream of the same key
    zero_key = ChaCha20Gaussian(bytes(32)).words(8)
    stream = ChaCha20Gaussian(key)
    first, second = stream.words(3), stream.words(5)
    # assert: the RFC block; consecutive reads continue the keystream (the secure-aggregation PRG's)
    assert zero_key.astype("<u8").tobytes() == RFC8439_ZERO_BLOCK
    assert np.array_equal(np.concatenate([first, second]), prg_words(key, 8))
    assert stream.words_used == 8


def test_edge_words_give_the_extreme_radii_and_never_log_zero() -> None:
    # prepare: radius words (0, 0) (U₁ = 2⁻¹²⁸) and (2⁶⁴ − 1, 2⁶⁴ − 1) (U₁ = 1), angle words 0 (Θ = 0)
    # and 2⁶² (Θ = π/2)
    top = 2**64 - 1
    words = np.array([0, top, 0, top, 0, 2**62], dtype=np.uint64)  # (high₀, high₁, low₀, low₁, angle₀, angle₁)
    # act
    z = words_to_normals(words)  # (R₀ cos Θ₀, R₁ cos Θ₁, R₀ sin Θ₀, R₁ sin Θ₁)
    # assert: the largest radius √(256 ln 2), all of it on the cosine at Θ = 0; radius 0 at U₁ = 1
    assert np.all(np.isfinite(z))
    assert z[0] == pytest.approx(R_MAX, rel=1e-15) and z[2] == 0.0
    assert z[1] == 0.0 and z[3] == 0.0


def test_a_quarter_turn_puts_the_radius_on_the_sine() -> None:
    # prepare: radius words 0, angle word 2⁶² → U₂ = 2⁵¹ · 2⁻⁵³ = 1/4
    words = np.array([0, 0, 2**62], dtype=np.uint64)
    # act
    cos_part, sin_part = words_to_normals(words)
    # assert
    assert abs(cos_part) < 1e-15 * R_MAX and sin_part == pytest.approx(R_MAX, rel=1e-15)


def test_draws_are_standard_normal() -> None:
    # prepare
    source = ChaCha20Gaussian.from_seed(2024)
    # act
    z = source.standard_normal(DRAWS)  # (DRAWS,)
    # assert: KS against N(0, 1); mean and variance within 5 standard errors; the cos and sin
    # halves uncorrelated; nothing beyond the radius cap; three words per two draws
    half = DRAWS // 2
    assert kstest(z, "norm").pvalue > ALPHA
    assert abs(z.mean()) < 5 / math.sqrt(DRAWS)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / DRAWS)
    assert abs(np.corrcoef(z[:half], z[half:])[0, 1]) < 5 / math.sqrt(half)
    assert np.abs(z).max() <= R_MAX
    assert source.words_used == 3 * DRAWS // 2


def test_an_odd_count_drops_the_last_normal_and_moves_on() -> None:
    # prepare
    a, b = ChaCha20Gaussian.from_seed(5), ChaCha20Gaussian.from_seed(5)
    # act
    odd, after = a.standard_normal(3), a.standard_normal(2)
    four, six = b.standard_normal(4), b.standard_normal(2)
    # assert: 3 draws use 6 words; the next draw starts at word 6, not at the dropped normal
    assert odd.shape == (3,) and np.array_equal(odd, four[:3])
    assert np.array_equal(after, six) and a.words_used == b.words_used == 9


def test_same_seed_same_noise_and_os_keys_differ() -> None:
    # act
    seeded = [ChaCha20Gaussian.from_seed(7).standard_normal(64) for _ in range(2)]
    other_seed = ChaCha20Gaussian.from_seed(8).standard_normal(64)
    from_os = [ChaCha20Gaussian.from_os().standard_normal(64) for _ in range(2)]
    # assert
    assert np.array_equal(seeded[0], seeded[1])
    assert not np.array_equal(seeded[0], other_seed)
    assert not np.array_equal(from_os[0], from_os[1])


def test_keys_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ChaCha20Gaussian(bytes(16))


def _one_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(6, 1, 32, 32, generator=gen) * 2 - 1  # (6, 1, 32, 32)
    fake = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1  # (4, 1, 32, 32)
    return real, torch.tensor([0, 1, 1, 0, 1, 0]), fake, torch.tensor([1, 0, 0, 1])


def _grad_after_pre_step(
    sigma: float, clip: float, seed: int | None, zero_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat p.grad after clip → noise → scale, torch RNG state changed?) for one batch of D."""
    cfg = app_model()
    _, netD = build_models(cfg, seed=3)
    priv = make_private_discriminator(
        netD, train=app_train(batch_size=5), noise_multiplier=sigma, max_grad_norm=clip,
        sample_rate=0.25, noise_seed=seed,
    )
    try:
        real, y_real, fake, y_fake = _one_batch(9)
        loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, cfg.conditional)
        priv.optimizer.zero_grad(set_to_none=True)
        (loss * 0.0 if zero_loss else loss).backward()
        rng_before = torch.get_rng_state()
        priv.optimizer.pre_step()  # clip, accumulate, add noise, divide by expected rows, hook
        rng_untouched = torch.equal(rng_before, torch.get_rng_state())
        grad = torch.cat([p.grad.flatten() for p in priv.module.parameters()])  # (D params,)
        assert priv.accountant.history == [(sigma, 0.25, 1)]  # the step hook ran once
        return grad, torch.tensor(rng_untouched)
    finally:
        priv.module._close()


def test_optimizer_noise_is_exactly_the_chacha20_draws_times_sigma_c() -> None:
    # prepare: the same batch without noise (σ = 0) and with seeded noise
    sigma, clip, seed, rows = 1.3, 0.7, 11, 2 * 5  # the public divisor 2·B, B = 5
    clipped, _ = _grad_after_pre_step(0.0, clip, seed=None)
    # act
    noisy, rng_untouched = _grad_after_pre_step(sigma, clip, seed=seed)
    # assert: grad·B − clipped sum = the keystream's normals · σC, in parameter order;
    # torch's global generator is not touched by the noise
    expected = ChaCha20Gaussian.from_seed(seed).standard_normal(noisy.numel()) * sigma * clip
    added = (noisy - clipped).double() * rows
    assert torch.allclose(added, torch.from_numpy(expected), rtol=1e-4, atol=1e-5)
    assert bool(rng_untouched)


def test_optimizer_noise_has_std_sigma_c_over_the_expected_batch_at_zero_gradients() -> None:
    # prepare: a zero loss, so every per-sample gradient and the clipped sum are 0
    sigma, clip, rows = 1.5, 0.8, 2 * 5  # the public divisor 2·B, B = 5
    # act: OS-keyed noise, the production path
    grad, _ = _grad_after_pre_step(sigma, clip, seed=None, zero_loss=True)
    # assert: p.grad = noise / B with noise ~ N(0, (σC)²) per coordinate
    n = grad.numel()
    z = grad.double().numpy() * rows / (sigma * clip)  # (D params,) should be N(0, 1)
    assert n > 10_000
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert kstest(z, "norm").pvalue > ALPHA


def test_sigma_zero_draws_no_noise_and_keeps_the_clipped_sum() -> None:
    # act: twice at σ = 0 with different seeds
    a, _ = _grad_after_pre_step(0.0, 0.7, seed=1)
    b, _ = _grad_after_pre_step(0.0, 0.7, seed=2)
    # assert: identical: nothing random was added
    assert torch.equal(a, b) and bool(a.abs().sum() > 0)


def test_a_full_step_counts_in_the_accountant_and_refuses_reused_gradients() -> None:
    # prepare
    cfg = app_model()
    _, netD = build_models(cfg, seed=0)
    priv = make_private_discriminator(
        netD, train=app_train(batch_size=6), noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.2
    )
    real, y_real, fake, y_fake = _one_batch(4)
    before = [p.detach().clone() for p in netD.parameters()]
    try:
        # act: two steps, then a step on gradients already used
        for _ in range(2):
            priv.optimizer.zero_grad(set_to_none=True)
            loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, cfg.conditional)
            loss.backward()
            priv.optimizer.step()
        # assert: the accountant saw both steps with the configured (σ, q); the weights moved;
        # Opacus's "no gradient used twice" check still holds
        assert priv.charge() == Charge(1.1, 0.2, 2)
        assert any(not torch.equal(a, b) for a, b in zip(before, netD.parameters(), strict=True))
        with pytest.raises(ValueError, match="zero_grad"):
            priv.optimizer.step()
    finally:
        priv.module._close()
