"""Evaluation of a pair model (``model.pairs``): are its (image, mask) pairs good enough to train a segmenter?

Three numbers, each the Dice (and IoU) of a small U-Net (Ronneberger, Fischer, Brox, "U-Net:
convolutional networks for biomedical image segmentation", MICCAI 2015) on masks:

* **synthetic → real** (train on synthetic, test on real; the segmentation form of TSTR): the
  U-Net is trained only on the generator's pairs and scored on real held-out pairs, which it
  segments after smoothing them to the synthetic images' sharpness (:func:`matching_sigma`; the
  Dice of the images as they are is reported beside it);
* **real → real** (the reference, TRTR): the same U-Net, same settings, trained on the real
  training pairs and scored on the same real held-out pairs; the goal of issue 17 is the ratio
  synthetic / real ≥ 0.85 at ε = 10;
* **agreement**: the real-trained U-Net applied to the synthetic images, scored against the
  synthetic masks: whether each synthetic mask matches its own image (goal ≥ 0.8).

Dice and IoU are pooled over all pixels of a set (2·|P∩T| / (|P| + |T|), |P∩T| / |P∪T|), not
averaged per image: a phantom without a lesion has an empty mask, for which a per-image Dice is
undefined. A set with no foreground at all in prediction and truth scores 1.

The U-Net is deliberately small (two poolings, GroupNorm, width ``UNET_WIDTH``): it is a
yardstick of the data, trained with a fixed seed and schedule, not a product. It is trained the
way segmenters are trained, with spatial and intensity augmentation (:func:`augment`; the kinds
nnU-Net applies by default: Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 2021), and every arm alike: a
segmenter trained on a small set without it learns where the set's objects happen to lie and how
bright they happen to be. Measured on HC18 (ε = 10, three seeds, docs/segmentation.md): without
augmentation the synthetic-trained U-Net's Dice on real images ranged 0.21–0.80 between
generators that drew their heads a little off the real ones' sizes and places; with it 0.69–0.78.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.evaluation.augment import affine_theta

UNET_WIDTH = 16
UNET_EPOCHS = 30
# The synthetic-trained U-Net learns from this many times the real training pairs (drawn from the
# model; synthetic pairs cost nothing), as TSTR of an image model trains on 5× its real images
# (common.evaluation.evaluate.TSTR_MULTIPLE). Measured on an HC18 ε = 10 generator (seed 0, 20
# epochs, pairs kept as the better-scoring half of twice as many by common.pair_filter's score):
# Dice on real test pairs 0.754 from 1× (700 pairs), 0.830 from 3×. The real-trained reference,
# which sees 1×, gains less from three times the steps: 0.960 at 20 epochs, 0.970 at 60.
PAIRS_MULTIPLE = 3
UNET_BATCH = 32
UNET_LR = 2e-3
# Augmentation, drawn per image (module docstring): zoom, rotation and shift together (one affine
# map of image and mask), gain and per-pixel multiplicative noise on the image, a 3×3 blur of
# half the batches, then a Gaussian blur, a contrast change and a gamma, each with its probability.
AUG_ZOOM = (0.7, 1.3)
AUG_ROTATION = math.pi / 6  # ±30°
AUG_SHIFT = 0.15  # ± in normalised coordinates (the image spans [-1, 1]): ±7.5 % of its width
AUG_GAIN = (0.7, 1.3)
AUG_NOISE = 0.3  # standard deviation of the multiplicative noise
AUG_BLUR = 0.5  # probability that a batch is blurred
AUG_GAUSSIAN_SIGMA = (0.5, 2.0)  # pixels, drawn uniformly; to σ 2 because a DP generator's images are that smooth
AUG_GAUSSIAN_P = 0.5
GAUSSIAN_RADIUS = math.ceil(3 * AUG_GAUSSIAN_SIGMA[1])  # the augmentation's kernel: 3σ of the widest blur
AUG_CONTRAST = (0.65, 1.5)  # factor on each pixel's distance from the image's mean brightness
AUG_CONTRAST_P = 0.5
AUG_GAMMA = (0.7, 1.5)  # brightness in [0, 1] raised to this power
AUG_GAMMA_P = 0.3
# The synthetic-trained U-Net segments real images smoothed to the synthetic images' sharpness
# (:func:`matching_sigma`): Gaussian σ in pixels, the first of these that matches best.
SMOOTHING_SIGMAS = tuple(0.25 * i for i in range(13))  # 0, 0.25, …, 3


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convolutions with GroupNorm and ReLU: (B, c_in, s, s) → (B, c_out, s, s)."""
    groups = 4 if c_out % 4 == 0 else 1
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out),
                         nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                         nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """image (B, 1, S, S) in [-1, 1] → mask logits (B, 1, S, S); S divisible by 4."""

    def __init__(self, width: int = UNET_WIDTH) -> None:
        super().__init__()
        self.enc1, self.enc2 = _block(1, width), _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # (B, w, S, S)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, S/2, S/2)
        m = self.mid(F.max_pool2d(e2, 2))  # (B, 4w, S/4, S/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))  # (B, 2w, S/2, S/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))  # (B, w, S, S)
        logits: torch.Tensor = self.out(d1)  # (B, 1, S, S)
        return logits


def train_unet(images: np.ndarray, masks: np.ndarray, *, seed: int, epochs: int = UNET_EPOCHS,
               width: int = UNET_WIDTH) -> SmallUNet:
    """A :class:`SmallUNet` trained on images (N, 1, S, S) in [-1, 1] and bool masks (N, S, S).

    Loss: binary cross-entropy plus soft Dice (1 − 2·Σpt / (Σp + Σt) over the batch), Adam,
    each batch augmented by :func:`augment`; everything seeded by ``seed``.
    """
    if images.ndim != 4 or images.shape[1] != 1 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"need images (N, 1, S, S) and masks (N, S, S), got {images.shape} and {masks.shape}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = SmallUNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=UNET_LR)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    t_all = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]  # (N, 1, S, S)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(x_all.shape[0], generator=gen)
        for start in range(0, order.numel(), UNET_BATCH):
            idx = order[start : start + UNET_BATCH]
            x, t = augment(x_all[idx], t_all[idx], gen)
            logits = net(x)
            p = torch.sigmoid(logits)
            soft_dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, t) + soft_dice
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def augment(x: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (b, 1, S, S) in [-1, 1] and masks (b, 1, S, S) in {0, 1} → the same, augmented alike.

    A horizontal flip (half the images); one affine map per image (zoom, rotation, shift: the
    ``AUG_*`` ranges, drawn uniformly) applied to the image (bilinear, black outside) and to the
    mask (bilinear, then > 0.5); then, on the image only, a gain, multiplicative noise and, for
    the whole batch with probability ``AUG_BLUR``, a 3×3 box blur; then per image, each with its
    probability, a Gaussian blur (σ in ``AUG_GAUSSIAN_SIGMA``), a contrast change about the image's
    mean brightness and a gamma (nnU-Net's intensity kinds, with a wider blur).

    Why the last three: without them the real-trained U-Net reads a DP generator's smooth, low-contrast
    heads as smaller than they are. On two HC18 ε = 10 generators its agreement with their masks was
    0.780 / 0.784, the area it found 0.69–0.75 of the masks'; with them 0.881 / 0.856 and 0.93, while
    its Dice on real test pairs stayed 0.964 → 0.963 and 0.966 → 0.960 (docs/segmentation.md).
    """
    b = x.shape[0]
    flip = (torch.rand(b, generator=gen) < 0.5)[:, None, None, None]  # (b, 1, 1, 1) image and mask together
    x, t = torch.where(flip, x.flip(-1), x), torch.where(flip, t.flip(-1), t)
    zoom = _uniform(AUG_ZOOM, b, gen)  # (b,)
    angle = (2 * torch.rand(b, generator=gen) - 1) * AUG_ROTATION  # (b,)
    tx, ty = ((2 * torch.rand(b, generator=gen) - 1) * AUG_SHIFT for _ in range(2))  # (b,) each
    theta = affine_theta(angle, zoom, tx, ty)  # (b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (b, S, S, 2)
    x = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # outside: -1, black
    t = (F.grid_sample(t, grid, align_corners=False, padding_mode="zeros") > 0.5).float()
    x01 = (x + 1) / 2 * _uniform(AUG_GAIN, b, gen)[:, None, None, None]
    x01 = x01 * (1 + AUG_NOISE * torch.randn(x.shape, generator=gen))
    if torch.rand(1, generator=gen).item() < AUG_BLUR:
        x01 = F.avg_pool2d(x01, 3, 1, 1)
    x01 = x01.clamp(0, 1)
    sigma = _uniform(AUG_GAUSSIAN_SIGMA, b, gen)  # (b,)
    blurred = torch.rand(b, generator=gen) < AUG_GAUSSIAN_P  # (b,)
    x01 = torch.where(blurred[:, None, None, None], gaussian_blur(x01, sigma, GAUSSIAN_RADIUS), x01)
    contrast = _maybe_uniform(AUG_CONTRAST, AUG_CONTRAST_P, b, gen)  # (b,)
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
    x01 = ((x01 - mean) * contrast[:, None, None, None] + mean).clamp(0, 1)
    x01 = x01 ** _maybe_uniform(AUG_GAMMA, AUG_GAMMA_P, b, gen)[:, None, None, None]
    return x01.clamp(0, 1) * 2 - 1, t


def _uniform(bounds: tuple[float, float], b: int, gen: torch.Generator) -> torch.Tensor:
    """(b,) drawn uniformly from ``bounds``."""
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(b, generator=gen)


def _maybe_uniform(bounds: tuple[float, float], p: float, b: int, gen: torch.Generator) -> torch.Tensor:
    """(b,): with probability ``p`` each, a value drawn uniformly from ``bounds``; else 1 (the identity of a
    factor or a power)."""
    applied = torch.rand(b, generator=gen) < p  # (b,)
    return torch.where(applied, _uniform(bounds, b, gen), torch.ones(b))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Images (b, 1, S, S), each convolved with a Gaussian of its own σ (b,) pixels, cut at ``radius``
    (separable, normalised to sum 1, edges replicated)."""
    b = x.shape[0]
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (2r+1,)
    kernel = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))  # (b, 2r+1)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    y = F.pad(x, (radius,) * 4, mode="replicate").transpose(0, 1)  # (1, b, S+2r, S+2r): one group per image
    y = F.conv2d(y, kernel.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, kernel.view(b, 1, -1, 1), groups=b)  # (1, b, S, S)
    return y.transpose(0, 1)


@torch.no_grad()
def smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """Images (N, 1, S, S) convolved with a Gaussian of ``sigma`` pixels (separable, radius ⌈3σ⌉, edges
    replicated); ``sigma`` 0 returns them unchanged."""
    if sigma <= 0 or len(images) == 0:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (N, 1, S, S)
    return gaussian_blur(x, torch.full((x.shape[0],), sigma), math.ceil(3 * sigma)).numpy()


def sharpness(images: np.ndarray) -> float:
    """Mean absolute difference between horizontally and between vertically adjacent pixels, summed."""
    x = np.asarray(images, dtype=np.float64)
    return float(np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean())


def matching_sigma(synthetic: np.ndarray, real: np.ndarray) -> float:
    """The σ of :data:`SMOOTHING_SIGMAS` after which the ``real`` images are as sharp as the ``synthetic`` ones.

    A generator trained under DP draws smoother images than the real ones (no speckle, soft edges), and
    a U-Net trained on them reads a real image's fine texture as structure it never saw. Smoothing the
    real images it segments to the synthetic set's sharpness (:func:`sharpness`) closes that gap; it
    reads the real images only, never their masks. 0 when the synthetic images are as sharp or sharper,
    or either set is empty.
    """
    if len(synthetic) == 0 or len(real) == 0:
        return 0.0  # nothing to match
    target = sharpness(synthetic)
    return min(SMOOTHING_SIGMAS, key=lambda s: abs(sharpness(smooth(real, s)) - target))


@torch.no_grad()
def predict(net: SmallUNet, images: np.ndarray) -> np.ndarray:
    """bool masks (N, S, S) of images (N, 1, S, S) in [-1, 1]: logit > 0."""
    net.eval()
    out = [net(torch.from_numpy(np.ascontiguousarray(images[i : i + 256], dtype=np.float32)))[:, 0] > 0
           for i in range(0, images.shape[0], 256)]
    return torch.cat(out).numpy() if out else np.zeros((0, *images.shape[2:]), bool)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pooled Dice and IoU of two bool mask stacks of one shape (1.0, 1.0 when both are empty)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


@dataclass(frozen=True)
class SegmentationScores:
    """A pair model's segmentation evaluation (module docstring); ``ratio`` = dice_synthetic / dice_real."""

    dice_synthetic: float  # U-Net trained on synthetic pairs, tested on real held-out pairs smoothed by smoothing_sigma
    iou_synthetic: float
    dice_synthetic_unsmoothed: float  # the same U-Net on the real held-out pairs as they are
    smoothing_sigma: float  # matching_sigma(synthetic images, real test images), pixels
    dice_real: float  # the same U-Net trained on the real training pairs, same test
    iou_real: float
    agreement_dice: float  # real-trained U-Net on synthetic images vs the synthetic masks
    agreement_iou: float
    n_synthetic: int
    n_real_train: int
    n_real_test: int
    epochs: int

    @property
    def ratio(self) -> float:
        return self.dice_synthetic / self.dice_real if self.dice_real > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass(frozen=True, eq=False)
class Pairs:
    """Images (N, 1, S, S) in [-1, 1] and bool masks (N, S, S), aligned row by row."""

    images: np.ndarray
    masks: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 1 or self.masks.shape != (
                self.images.shape[0], *self.images.shape[2:]) or self.masks.dtype != np.bool_:
            raise ValueError(f"pairs need images (N, 1, S, S) and bool masks (N, S, S), got {self.images.shape} "
                             f"and {self.masks.dtype} {self.masks.shape}")

    @staticmethod
    def of_channels(rows: np.ndarray) -> Pairs:
        """Split (N, 2, S, S) rows (a pair cache's, a pair generator's) into images and masks (mask > 0)."""
        if rows.ndim != 4 or rows.shape[1] != 2:
            raise ValueError(f"pair rows must be (N, 2, S, S), got {rows.shape}")
        return Pairs(np.ascontiguousarray(rows[:, :1], dtype=np.float32), rows[:, 1] > 0.0)


def real_reference_net(real_train: Pairs, *, seed: int, epochs: int = UNET_EPOCHS) -> SmallUNet:
    """The real-trained U-Net: TRTR's model and the agreement judge (depends on the real data only)."""
    return train_unet(real_train.images, real_train.masks, seed=seed, epochs=epochs)


def evaluate_pairs(synthetic: Pairs, real_train: Pairs, real_test: Pairs, *, seed: int,
                   epochs: int = UNET_EPOCHS, real_net: SmallUNet | None = None) -> SegmentationScores:
    """Train-synthetic/test-real, train-real/test-real and the agreement check (module docstring).

    ``real_net``: a U-Net already trained on ``real_train`` with the same seed and epochs
    (:func:`real_reference_net`), to score several generators against one reference.
    """
    net_real = real_net if real_net is not None else real_reference_net(real_train, seed=seed, epochs=epochs)
    net_syn = train_unet(synthetic.images, synthetic.masks, seed=seed, epochs=epochs)
    sigma = matching_sigma(synthetic.images, real_test.images)
    d_syn, i_syn = dice_iou(predict(net_syn, smooth(real_test.images, sigma)), real_test.masks)
    d_syn_as_is = d_syn if sigma == 0 else dice_iou(predict(net_syn, real_test.images), real_test.masks)[0]
    d_real, i_real = dice_iou(predict(net_real, real_test.images), real_test.masks)
    d_agree, i_agree = dice_iou(predict(net_real, synthetic.images), synthetic.masks)
    return SegmentationScores(dice_synthetic=d_syn, iou_synthetic=i_syn, dice_synthetic_unsmoothed=d_syn_as_is,
                              smoothing_sigma=sigma, dice_real=d_real, iou_real=i_real,
                              agreement_dice=d_agree, agreement_iou=i_agree, n_synthetic=len(synthetic.images),
                              n_real_train=len(real_train.images), n_real_test=len(real_test.images), epochs=epochs)
