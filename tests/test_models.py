"""The generator's resize upsampling: one transposed convolution that is upsample-then-convolve."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from common.config import run_config
from common.models import Discriminator, Generator, ResizeConv2d, build_models, draw_images, sample_latents


@pytest.mark.parametrize(("c_in", "c_out", "side", "bias"), [(64, 32, 4, False), (32, 16, 8, False), (16, 1, 16, True),
                                                             (5, 3, 7, True)])
def test_resize_conv_is_nearest_upsampling_then_the_3x3_convolution(c_in: int, c_out: int, side: int,
                                                                     bias: bool) -> None:
    # prepare: the layer, and the same weights applied the plain way (upsample ×2, then conv2d, padding 1)
    torch.manual_seed(0)
    layer = ResizeConv2d(c_in, c_out, 3, 1, 1, bias=bias)
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(4, c_in, side, side, requires_grad=True)  # (B, c_in, s, s)
    probe = torch.randn(4, c_out, 2 * side, 2 * side)  # a random direction for the backward pass
    # act
    folded = layer(x)  # (B, c_out, 2s, 2s)
    grads_folded = torch.autograd.grad((folded * probe).sum(), [x, layer.weight])
    plain = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), layer.weight, layer.bias, padding=1)
    grads_plain = torch.autograd.grad((plain * probe).sum(), [x, layer.weight])
    # assert: the same function and the same gradients, up to float32 rounding
    assert folded.shape == plain.shape == (4, c_out, 2 * side, 2 * side)
    assert torch.allclose(folded, plain, atol=1e-5, rtol=0)
    for got, want in zip(grads_folded, grads_plain, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


def test_the_generator_keeps_its_parameter_names_and_shapes() -> None:
    # prepare: the app's generator (resize upsampling, 32×32)
    cfg = run_config().model
    # act
    netG, _ = build_models(cfg, seed=0)
    shapes = {k: tuple(v.shape) for k, v in netG.state_dict().items() if k.startswith("body.")}
    # assert: the names checkpoints written with nn.Upsample + nn.Conv2d carry (each stage: upsample,
    # 3×3 convolution, GroupNorm, ReLU; the last: upsample, convolution, tanh)
    top = cfg.g_width * 4
    assert shapes == {
        "body.1.weight": (top // 2, top, 3, 3), "body.2.weight": (top // 2,), "body.2.bias": (top // 2,),
        "body.5.weight": (top // 4, top // 2, 3, 3), "body.6.weight": (top // 4,), "body.6.bias": (top // 4,),
        "body.9.weight": (cfg.channels, top // 4, 3, 3), "body.9.bias": (cfg.channels,),
    }
    assert netG(torch.zeros(2, cfg.latent_dim), torch.tensor([0, 1])).shape == (2, cfg.channels, 32, 32)


def _class_filter_models(aux: bool = True) -> tuple[Generator, Discriminator]:
    cfg = replace(run_config({"model.aux-classifier": aux}).model, num_classes=2)
    netG, netD = build_models(cfg, seed=3)
    with torch.no_grad():  # a class head that prefers bright images for class 1: the filter has something to pick
        first = netD.body[0]
        assert isinstance(first, torch.nn.Conv2d)
        first.weight.add_(0.05)
        if netD.classify is not None:
            netD.classify.weight[1].add_(0.5)
    netG.eval()
    netD.eval()
    return netG, netD


def test_the_class_filter_keeps_the_candidate_the_class_head_likes_best() -> None:
    # prepare: the candidates drawn independently from the same latent stream
    netG, netD = _class_filter_models()
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    k, b = 3, labels.shape[0]
    with torch.no_grad():
        z = sample_latents(k * b, netG.cfg.latent_dim, torch.Generator().manual_seed(5))
        candidates = netG(z, labels.repeat(k)).view(k, b, 1, 32, 32)
        log_p = torch.stack([netD(candidates[j], labels)[1].log_softmax(1)[torch.arange(b), labels] for j in range(k)])
    # act
    kept = draw_images(netG, netD, labels, torch.Generator().manual_seed(5), candidates=k)
    # assert: each kept image is its best-scored candidate, and the filter raised the class head's mean belief
    best = log_p.argmax(dim=0)
    assert torch.equal(kept, candidates[best, torch.arange(b)])
    assert log_p.max(dim=0).values.mean() > log_p.mean()
    assert len(set(best.tolist())) > 1  # not always the first draw


def test_one_candidate_or_no_class_head_is_the_plain_draw() -> None:
    # prepare
    netG, netD = _class_filter_models()
    bare_G, bare_D = _class_filter_models(aux=False)
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        plain = netG(sample_latents(3, netG.cfg.latent_dim, torch.Generator().manual_seed(9)), labels)
        bare = bare_G(sample_latents(3, bare_G.cfg.latent_dim, torch.Generator().manual_seed(9)), labels)
    # act
    one = draw_images(netG, netD, labels, torch.Generator().manual_seed(9), candidates=1)
    headless = draw_images(bare_G, bare_D, labels, torch.Generator().manual_seed(9), candidates=3)
    # assert
    assert torch.equal(one, plain)
    assert torch.equal(headless, bare)
    with pytest.raises(ValueError, match="at least 1"):
        draw_images(netG, netD, labels, torch.Generator(), candidates=0)


def test_the_latent_scale_truncates_a_conditional_generator_only() -> None:
    # prepare: an unconditional pair generator and a conditional image generator, same latents
    torch.manual_seed(0)
    pair_G = Generator(run_config({"model.pairs": True, "model.conditional": False,
                                   "model.aux-classifier": False}).model).eval()
    cond_G = Generator(run_config({}).model).eval()
    z = torch.randn(4, pair_G.cfg.latent_dim, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1])
    # act
    with torch.no_grad():
        pair_full, pair_scaled = pair_G(z), pair_G(0.3 * z)
        cond_full, cond_scaled = cond_G(z, y), cond_G(0.3 * z, y)
    # assert: GroupNorm after the bias-free projection divides the factor out (common/models.py)
    assert (pair_full - pair_scaled).abs().max() < 1e-4
    assert (cond_full - cond_scaled).abs().max() > 1e-2
