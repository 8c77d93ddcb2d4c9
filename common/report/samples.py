"""Sample grids: a fixed set of latent vectors, one row per class, saved as a PNG.

The latents come from a private ``torch.Generator`` with a fixed seed, so the grids of
successive rounds show the same z and can be compared by eye. Sampling is post-processing of
the generator; it touches no data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.config import ModelConfig
from common.models import Generator, sample_latents


@torch.no_grad()
def generate(
    netG: Generator, cfg: ModelConfig, labels: torch.Tensor, *, seed: int | None = None
) -> np.ndarray:
    """Images (n, S, S) float32 in [-1, 1] for the given class labels (n,), G in eval mode,
    latents at the sampling spread (:data:`common.models.LATENT_SCALE`). A pair model's image and
    mask lie side by side: (n, S, 2S)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = sample_latents(labels.shape[0], cfg.latent_dim, gen)  # (n, latent)
    was_training = netG.training
    netG.eval()
    try:
        out = netG(z, labels if cfg.conditional else None)  # (n, 1, S, S)
    finally:
        netG.train(was_training)
    images: np.ndarray = torch.cat(list(out.unbind(dim=1)), dim=-1).cpu().numpy()  # (n, S, C·S)
    return images


def sample_grid(netG: Generator, cfg: ModelConfig, *, per_class: int = 8, seed: int = 0) -> np.ndarray:
    """A uint8 image (rows·(S+2), per_class·(W+2)): row c holds class c (one row if unconditional);
    W = S, or 2S for a pair model (image, then its mask)."""
    rows = cfg.num_classes if cfg.conditional else 1
    labels = torch.arange(rows).repeat_interleave(per_class)  # (rows·per_class,)
    imgs = generate(netG, cfg, labels, seed=seed)  # (rows·per_class, S, W)
    s, w, pad = cfg.image_size, cfg.image_size * cfg.channels, 2
    grid = np.zeros((rows * (s + pad), per_class * (w + pad)), np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, per_class)
        grid[r * (s + pad) : r * (s + pad) + s, c * (w + pad) : c * (w + pad) + w] = to_uint8(img)
    return grid


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[-1, 1] → [0, 255] (clipped)."""
    return np.clip((img + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path, *, scale: int = 2) -> None:
    """Save a greyscale uint8 image, upscaled by nearest neighbour so small grids stay legible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image)  # (H, W) uint8 → mode "L"
    if scale > 1:
        pil = pil.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG")
    tmp.replace(path)
