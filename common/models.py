"""DCGAN generator and discriminator for single-channel images (32×32 or 64×64).

Radford, Metz, Chintala, "Unsupervised representation learning with deep convolutional GANs"
(ICLR 2016), with two changes for private federated training:

* the discriminator uses GroupNorm, not BatchNorm: BatchNorm mixes samples in a batch, so
  per-sample gradients (and therefore DP-SGD) are undefined for it; Opacus's validator refuses it;
* class conditioning (optional) so a user can ask for more images of a rare class: the
  generator concatenates a label embedding to z, the discriminator uses a projection head
  (Miyato & Koyama, "cGANs with projection discriminator", ICLR 2018);
* an auxiliary classifier head on the discriminator (``model.aux-classifier``; Odena, Olah,
  Shlens, "Conditional image synthesis with auxiliary classifier GANs", ICML 2017). Under DP
  noise the projection term alone carries too weak a class signal: generators tuned on
  PneumoniaMNIST at ε = 10 often drew images whose content did not follow the requested
  class (TSTR AUC down to 0.19, i.e. classes swapped). The head is trained on real rows only
  (a classifier of the site's real images, privately, inside the same clipped per-row
  gradient), and G is asked to make images it classifies as the requested class.

The generator could use BatchNorm (it never sees data), but it uses GroupNorm too: BatchNorm's
running statistics made eval-mode samples 4-6× less diverse than train-mode ones after a few
hundred steps (measured: per-pixel std across samples 0.018 vs 0.084), and they would be one
more thing to average across hospitals. GroupNorm behaves the same in both modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import CANDIDATES, LATENT_SCALE, ModelConfig

# Sampling spread. Every synthetic image is drawn with z ~ N(0, LATENT_SCALE² · I), LATENT_SCALE
# written in common.config (so command help shows it without importing torch); training draws
# z ~ N(0, I). This is the "truncation trick" (Marchesi 2017; Brock, Donahue, Simonyan, "Large
# scale GAN training for high fidelity natural image synthesis", ICLR 2019): latents nearer the
# mode give images more typical of their class, at some cost in diversity. Measured on
# PneumoniaMNIST (docs/benchmarks.md; the same generator sampled both ways): TSTR AUC higher at
# ε = 10 and ε = 1. Post-processing of the generator, so no privacy cost; ``--latent-scale 1``
# on ``medsynth sample``/``evaluate`` draws as in training. An unconditional generator (the pair
# models) has no effect from the scale: its bias-free projection of z is followed by GroupNorm,
# which divides out any common factor, so its images depend on z's direction alone (checked by
# tests/test_models.py). Only a conditional G, whose label embedding is joined to z, is truncated.


def sample_latents(n: int, latent_dim: int, gen: torch.Generator | None, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Latents (n, latent_dim) ~ N(0, scale² · I) for sampling (not training) from ``gen``.

    Sampling draws at :data:`LATENT_SCALE` by default (see the comment above it); 1 draws as in training.
    """
    if not scale > 0:
        raise ValueError(f"the latent scale must be > 0, got {scale}")
    return scale * torch.randn(n, latent_dim, generator=gen)


# The class filter. Each synthetic image is the best of CANDIDATES draws of its class: G draws
# that many images for the requested class and the one the discriminator's class head (the
# auxiliary classifier above, trained privately on real rows only) finds most likely to be of
# that class is kept. It is rejection sampling with the released discriminator, as in
# discriminator rejection sampling (Azadi, Olsson, Darrell, Goodfellow, Odena, ICLR 2019), with
# the class head as the judge, as synthetic training sets are filtered by a classifier's
# confidence (He et al., "Is synthetic data from generative models ready for image
# recognition?", ICLR 2023). D is the output of the accounted mechanism like G, so filtering is
# post-processing: no privacy cost. Measured on PneumoniaMNIST (docs/benchmarks.md): TSTR AUC of
# three ε = 10 generators 0.864 unfiltered, 0.911 best of 3 (mean of the seeds). Pair models (channel 1 a mask) are
# not judged by class: their samplers keep the best of K pairs by common.pair_filter's consistency filter.


def class_filter_applies(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s discriminator can judge class membership: a class head and at least two classes."""
    return cfg.conditional and cfg.aux_classifier and cfg.num_classes > 1 and not cfg.pairs


@torch.no_grad()
def draw_images(netG: Generator, netD: Discriminator | None, labels: torch.Tensor, gen: torch.Generator, *,
                latent_scale: float = LATENT_SCALE, candidates: int = CANDIDATES) -> torch.Tensor:
    """Images (b, C, S, S) for ``labels`` (b,): each the best of ``candidates`` draws by D's class head.

    Latents come from ``gen`` as (candidates·b, latent) in one draw, candidate j of image i at row
    j·b + i; with ``candidates`` 1, or a model the filter does not apply to (``netD`` None, see
    :func:`class_filter_applies`), this is G at b latents, exactly the unfiltered draw.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    cfg = netG.cfg
    y = labels if cfg.conditional else None
    if netD is None or candidates == 1 or not class_filter_applies(cfg):
        plain: torch.Tensor = netG(sample_latents(labels.shape[0], cfg.latent_dim, gen, latent_scale), y)
        return plain  # (b, C, S, S)
    b = labels.shape[0]
    ys = labels.repeat(candidates)  # (k·b,): candidate j of image i at j·b + i
    images = netG(sample_latents(candidates * b, cfg.latent_dim, gen, latent_scale), ys)  # (k·b, C, S, S)
    _, class_logits = netD(images, ys)
    if class_logits is None:
        raise ValueError("the class filter needs a discriminator with a class head (model.aux-classifier)")
    p_own = class_logits.log_softmax(dim=1).gather(1, ys[:, None]).view(candidates, b)  # (k, b) log p(y | x)
    best = p_own.argmax(dim=0)  # (b,)
    kept: torch.Tensor = images.view(candidates, b, *images.shape[1:])[best, torch.arange(b)]
    return kept  # (b, C, S, S)


def _groups(channels: int) -> int:
    """GroupNorm group count: 8 when it divides the channels, else 4 (widths are multiples of 4)."""
    return 8 if channels % 8 == 0 else 4


def _upsample(kind: str, c_in: int, c_out: int, *, bias: bool) -> list[nn.Module]:
    """Double the side: (B, c_in, s, s) → (B, c_out, 2s, 2s).

    ``transposed``: DCGAN's 4×4 stride-2 transposed convolution. Its kernel overlaps unevenly
    (each output pixel sums 1, 2 or 4 kernel taps by position), which draws the checkerboard
    seen in every sample under DP noise (Odena, Dumoulin, Olah, "Deconvolution and checkerboard
    artifacts", Distill 2016). ``resize``: nearest-neighbour upsampling then a 3×3 convolution,
    the fix that paper proposes: every output pixel sees the same number of taps.
    """
    if kind == "transposed":
        return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)]
    # nn.Identity() where nn.Upsample stood: the parameters keep the names (g.body.1.weight, …) of
    # checkpoints written when the pair was nn.Upsample + nn.Conv2d; ResizeConv2d does both.
    return [nn.Identity(), ResizeConv2d(c_in, c_out, 3, 1, 1, bias=bias)]


class ResizeConv2d(nn.Conv2d):
    """Nearest-neighbour ×2 upsampling, then this 3×3 convolution (padding 1): (B, c_in, s, s) →
    (B, c_out, 2s, 2s), computed as one stride-2 transposed convolution at the input's resolution.

    Along one axis, output pixel 2m + a of upsample-then-convolve sums the inputs m − 1 and m
    (a = 0: x[m−1]·w0 + x[m]·(w1 + w2)) or m and m + 1 (a = 1: x[m]·(w0 + w1) + x[m+1]·w2). A
    stride-2 transposed convolution with padding 1 computes y[2m + a] = Σ_i x[i]·K[2m + a + 1 − 2i],
    so the kernel K = [w2, w1 + w2, w0 + w1, w0] gives the same function, folded along both axes
    into a 4×4 kernel (the 3×3 weight stays the parameter: same initialisation, same gradients,
    same checkpoints). Equal up to float rounding (max |difference| ≈ 2e-6, tests/test_models.py).
    It never builds the upsampled (B, c_in, 2s, 2s) tensor and does 16 multiply-adds per input
    pixel and channel pair instead of 36: G's forward and backward at the app's defaults (batch 32,
    one core) went from 30 to 15 ms (docs/benchmarks.md).
    Its 4×4 kernel is a sum of shifted 3×3 ones, so each output pixel still sees the same taps:
    no checkerboard (the reason for ``resize``), unlike a free transposed convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _fold(_fold(self.weight, 2), 3)  # (c_out, c_in, 3, 3) → (c_out, c_in, 4, 3) → (c_out, c_in, 4, 4)
        return F.conv_transpose2d(x, kernel.transpose(0, 1), self.bias, stride=2, padding=1)  # (B, c_out, 2s, 2s)


def _fold(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps [w0, w1, w2] along ``dim`` → the 4 of :class:`ResizeConv2d`'s kernel, [w2, w1 + w2, w0 + w1, w0]."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class Generator(nn.Module):
    """z (B, latent) [+ label (B,)] → image (B, C, S, S) in [-1, 1] (tanh); C = 2 (image, mask) in pair mode."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stages = 3 if cfg.image_size == 32 else 4  # 4 → 32 or 4 → 64 by doubling
        top = cfg.g_width * 2 ** (stages - 1)
        in_dim = cfg.latent_dim * (2 if cfg.conditional else 1)
        self.label_embedding = nn.Embedding(cfg.num_classes, cfg.latent_dim) if cfg.conditional else None
        self.project = nn.Linear(in_dim, top * 4 * 4, bias=False)
        self.project_norm = nn.Sequential(nn.GroupNorm(_groups(top), top), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        ch = top
        for _ in range(stages - 1):
            layers += [*_upsample(cfg.upsample, ch, ch // 2, bias=False), nn.GroupNorm(_groups(ch // 2), ch // 2),
                       nn.ReLU(inplace=True)]
            ch //= 2
        layers += [*_upsample(cfg.upsample, ch, cfg.channels, bias=True), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self._top = top

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("conditional generator needs labels (B,) of class indices")
            z = torch.cat([z, self.label_embedding(labels)], dim=1)  # (B, 2·latent)
        h = self.project_norm(self.project(z).view(z.shape[0], self._top, 4, 4))  # (B, top, 4, 4)
        out: torch.Tensor = self.body(h)  # (B, C, S, S)
        return out


class Discriminator(nn.Module):
    """image (B, C, S, S) [+ label (B,)] → (real/fake logit (B,), class logits (B, K) or None).

    In pair mode (C = 2) D judges image and mask together: one row, one per-sample gradient.

    No cross-sample operation anywhere. Class logits come only with ``cfg.aux_classifier``
    (and a conditional model).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stages = 3 if cfg.image_size == 32 else 4  # S → 4 by halving
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, cfg.d_width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = cfg.d_width
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.GroupNorm(_groups(ch * 2), ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        feat = ch * 4 * 4
        self.head = nn.Linear(feat, 1)
        # Projection as a bias-free Linear on a one-hot label (an embedding lookup, written so
        # that its input can carry requires_grad; see forward).
        self.label_projection = nn.Linear(cfg.num_classes, feat, bias=False) if cfg.conditional else None
        aux = cfg.conditional and cfg.aux_classifier
        self.classify = nn.Linear(feat, cfg.num_classes) if aux else None

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.body(x)  # (B, feat)
        class_logits = self.classify(h) if self.classify is not None else None  # (B, K)
        logit = self.head(h).squeeze(1)  # (B,)
        if self.label_projection is not None:
            if labels is None:
                raise ValueError("conditional discriminator needs labels (B,) of class indices")
            # The one-hot input requires grad only so that torch's full backward hooks (which
            # Opacus's hook mode registers; production uses ExpandedWeights, the benchmark times
            # both) see a differentiable input and do not warn; its gradient (B, K) is never used.
            onehot = F.one_hot(labels, self.cfg.num_classes).to(h.dtype).requires_grad_(True)
            logit = logit + (self.label_projection(onehot) * h).sum(dim=1)  # (B,) projection
        return logit, class_logits


def build_models(cfg: ModelConfig, seed: int | None = None) -> tuple[Generator, Discriminator]:
    """Fresh G and D; DCGAN init N(0, 0.02) for conv weights. ``seed`` makes it reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    g, d = Generator(cfg), Discriminator(cfg)
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return g, d


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` force it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
