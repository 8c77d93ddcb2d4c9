"""A private class-conditional mean embedding: the hospitals' warm start and anchor for G.

Why. Under DP noise the adversarial signal is weak and unstable: at ε = 1 some seeds drew the
classes swapped (TSTR AUC 0.19), and without noise the GAN itself varied from AUC 0.72 to 0.94
between seeds. DP-MERF (Harder, Adamczewski, Park, "DP-MERF: differentially private mean
embeddings with random features", AISTATS 2021) shows that one noisy release of each class's
mean feature vector is enough to train a generator by matching those means (a maximum mean
discrepancy with a random-feature kernel). Here that release starts the federation: the server
pre-trains G on the summed means before the first GAN round, and every G step afterwards keeps
G near them (a term in G's loss), so D's noisy signal refines a generator that already draws
each class where it belongs.

The mechanism. Each patient contributes one vector v of norm ≤ 1: the mean over the patient's
images of φ(x) placed in the slot of the image's class (φ(x) ⊗ onehot(y), plus a constant in
the class's count slot). The hospital releases Σ_patients v + N(0, σ²·I): the Gaussian
mechanism with ℓ2 sensitivity 1 under adding or removing one patient (Dwork & Roth 2014,
§3.5.3), i.e. one step of the sampled Gaussian mechanism at sampling rate 1, which the ledger
charges as ``Charge(σ, 1.0, 1)`` and composes with the DP-SGD steps. The release travels in the
secure sum; the server sees only the sum over hospitals and divides by the (noisy) counts it
contains. Everything downstream (pre-training, the anchor term) is post-processing.

The features are public: fixed by the image side and a public seed, never fitted to data.
  * coarse pixels: the image average-pooled to 8×8 (64 values in [-1, 1]; norm ≤ 8), scaled
    by ``COARSE / 8``: the class's mean image at low resolution;
  * random Fourier features (Rahimi & Recht, NIPS 2007) of the image pooled to 16×16:
    [cos(Wx), sin(Wx)] / √D with W ~ N(0, 1/ℓ²), norm exactly 1, scaled by ``FOURIER``: the
    Gaussian kernel k(x, x') = exp(−‖x − x'‖² / 2ℓ²) whose mean embedding matches higher moments;
    half the frequencies use ℓ = √256 / 8 (= 2) and half ℓ = √256 / 4 (= 4) pixel-value units,
    fixed, not fitted (the median heuristic would look at the data). The narrower pair scored
    higher than ℓ = 4 and 8 (TSTR AUC on PneumoniaMNIST, docs/benchmarks.md);
  * the count slot ``COUNT``: with COARSE² + FOURIER² + COUNT² ≤ 1 every vector has norm ≤ 1.

Image–mask pairs (``model.pairs``, C = 2 channels): both channels enter both parts, jointly: the
coarse part pools each channel (C·64 values, norm ≤ 8·√C, scaled by ``COARSE / (8·√C)``) and the
Fourier part takes the joined C·256 vector (ℓ = √(C·256) / 8 and / 4), so the kernel compares
pairs, image and mask together, and the matched mean embedding says where masks lie on images.
Measured on HC18 (ε = 10, seed 0, docs/segmentation.md): the synthetic masks' agreement with their
own images (a real-trained U-Net's Dice) rose from 0.17 with the image channel alone to 0.61.

How many frequencies (``warm-start.frequencies``, D). The Fourier part's signal, a class's
summed mean embedding, has a norm that hardly depends on D (PneumoniaMNIST, 4 hospitals: 332
for the rarer class at D = 250, 500 or 2000), while the noise on it has norm σ·√(2D) per
hospital: at ε = 1 (σ = 4.63) the summed noise is 585 at D = 2000 and 292 at D = 500. More
frequencies approximate the kernel better, so the best D falls as σ rises: measured, TSTR AUC
0.770 → 0.836 at ε = 1 from 2000 to 500, 0.918 and 0.913 at ε = 10, 0.933 → 0.921 without noise.
The default is 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ModelConfig, TrainConfig, WarmStartConfig
from common.dp.warm_start import COARSE, COARSE_SIDE, COUNT, FOURIER, FOURIER_SIDE, EmbeddingSpec


class FeatureMap:
    """φ: images (B, 1, S, S) in [-1, 1] → (B, feature_dim), each row of norm ≤ √(COARSE² + FOURIER²).

    Differentiable (torch), so the generator can be trained through it.
    """

    def __init__(self, spec: EmbeddingSpec) -> None:
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        dim = spec.channels * FOURIER_SIDE**2
        scales = torch.tensor([math.sqrt(dim) / 8, math.sqrt(dim) / 4]).repeat_interleave(
            math.ceil(spec.frequencies / 2))[: spec.frequencies]  # (D,) lengthscales ℓ
        self.freqs = torch.randn(dim, spec.frequencies, generator=gen) / scales  # (C·256, D)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Pairs (B, 2, S, S): image and mask embedded together, so the kernel sees their joint law
        # (where the mask lies on the image), not each channel's alone.
        c = self.spec.channels
        x = x[:, :c]  # (B, C, S, S)
        coarse = F.adaptive_avg_pool2d(x, COARSE_SIDE).flatten(1) * (COARSE / (COARSE_SIDE * math.sqrt(c)))  # (B, C·64)
        proj = F.adaptive_avg_pool2d(x, FOURIER_SIDE).flatten(1) @ self.freqs.to(x.device)  # (B, D)
        fourier = torch.cat([proj.cos(), proj.sin()], dim=1) * (FOURIER / math.sqrt(self.spec.frequencies))
        return torch.cat([coarse, fourier], dim=1)  # (B, C·64 + 2D)


def patient_sum(spec: EmbeddingSpec, images: np.ndarray, labels: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Σ over patients of the patient's mean vector v (norm ≤ 1 each): (spec.size,) float64, not yet noised.

    A patient with m images contributes each image's φ ⊗ onehot(y) (and COUNT in y's count
    slot) with weight 1/m: the mean of vectors of norm ≤ 1, so still of norm ≤ 1.
    """
    phi = FeatureMap(spec)
    feats = np.zeros((images.shape[0], spec.feature_dim), dtype=np.float64)  # (N, F)
    for start in range(0, images.shape[0], 512):
        with torch.no_grad():
            feats[start : start + 512] = phi(torch.from_numpy(images[start : start + 512])).double().numpy()
    _, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inverse]  # (N,) 1/m of each image's patient
    total = np.zeros((spec.num_classes, spec.feature_dim + 1), dtype=np.float64)  # (K, F + 1)
    for k in range(spec.num_classes):
        mine = labels == k
        total[k, :-1] = weight[mine] @ feats[mine]
        total[k, -1] = COUNT * weight[mine].sum()
    return total.ravel()


@dataclass(frozen=True)
class ClassTargets:
    """What the server derives from the summed release: per class, the mean φ and the (noisy) count."""

    means: torch.Tensor  # (K, F)
    counts: torch.Tensor  # (K,) noisy patient counts, at least 1

    @staticmethod
    def from_sum(spec: EmbeddingSpec, total: np.ndarray) -> ClassTargets:
        """Divide each class's feature sum by its noisy count (post-processing of the release)."""
        if total.shape != (spec.size,):
            raise ValueError(f"expected a summed embedding of {spec.size} values, got shape {total.shape}")
        per_class = torch.from_numpy(np.asarray(total, dtype=np.float32)).view(spec.num_classes, spec.feature_dim + 1)
        counts = (per_class[:, -1] / COUNT).clamp_min(1.0)  # (K,)
        return ClassTargets(means=per_class[:, :-1] / counts[:, None], counts=counts)


def embedding_loss(phi: FeatureMap, fake: torch.Tensor, labels: torch.Tensor, targets: ClassTargets) -> torch.Tensor:
    """Σ_k ‖mean φ(G(z, k)) − μ_k‖² over the classes present in ``labels``: MMD² with the features' kernel."""
    feats = phi(fake)  # (B, F)
    loss = fake.new_zeros(())
    for k in labels.unique():
        mask = labels == k
        loss = loss + (feats[mask].mean(dim=0) - targets.means[int(k)].to(fake.device)).pow(2).sum()
    return loss


@dataclass(frozen=True)
class Anchor:
    """The released targets as a term of every G step: ``weight`` × :func:`embedding_loss`."""

    phi: FeatureMap
    targets: ClassTargets
    weight: float

    def loss(self, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.weight * embedding_loss(self.phi, fake, labels, self.targets)

    @staticmethod
    def of_release(spec: EmbeddingSpec, total: np.ndarray, weight: float) -> Anchor:
        """The anchor a summed release ``total`` (spec.size,) defines: every side builds it this way."""
        return Anchor(FeatureMap(spec), ClassTargets.from_sum(spec, total), weight)


def pretrain_generator(
    netG: torch.nn.Module, anchor: Anchor, *, latent_dim: int, num_classes: int, steps: int, batch_size: int,
    lr: float, beta1: float, seed: int, device: torch.device,
) -> float:
    """Fit G to the released class means alone (DP-MERF's generator training): post-processing.

    Labels are uniform over the classes, latents N(0, I) from ``seed`` (public). Returns the last
    step's embedding loss.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(netG.parameters(), lr=lr, betas=(beta1, 0.999))
    netG.to(device).train()
    last = float("nan")
    for _ in range(steps):
        z = torch.randn(batch_size, latent_dim, device=device, generator=gen)  # (B, latent)
        y = torch.randint(0, num_classes, (batch_size,), device=device, generator=gen)  # (B,)
        loss = embedding_loss(anchor.phi, netG(z, y), y, anchor.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
    return last


def warm_start_generator(
    netG: torch.nn.Module, spec: EmbeddingSpec, total: np.ndarray, *, warm_start: WarmStartConfig,
    model: ModelConfig, train: TrainConfig, seed: int, device: torch.device,
) -> tuple[Anchor, float]:
    """Round 0's post-processing, one definition for the server and the in-process simulation:
    the anchor of the summed release ``total`` and G pre-trained on it with the run's settings.

    Returns the anchor and the last pre-training step's embedding loss.
    """
    anchor = Anchor.of_release(spec, total, warm_start.anchor_weight)
    loss = pretrain_generator(netG, anchor, latent_dim=model.latent_dim, num_classes=model.num_classes,
                              steps=warm_start.pretrain_steps, batch_size=train.batch_size, lr=train.lr_g,
                              beta1=train.beta1, seed=seed, device=device)
    return anchor, loss
