"""Optional denoising of a decoded frame before it is resized into the cache: a median filter for impulse noise.

Archives hold images with salt-and-pepper (impulse) noise: isolated pixels forced to black or
white by transmission errors, dead detector elements or digitised film scratches. A median filter
replaces each pixel by the median of its k×k neighbourhood, which removes isolated outliers and
keeps edges (Gonzalez & Woods, "Digital Image Processing", order-statistic filters; Huang, Yang &
Tang 1979 for the running median). It is applied at the frame's own resolution, before resizing
averages an outlier into its neighbours where a median can no longer remove it.

It is one of the prepare settings, recorded in the cache fingerprint (``client.prepare.pipeline``),
so choosing it, or dropping it, rebuilds the cache. Names: ``none`` and ``median3``/``median5``
(k = 3 or 5). ``common`` because the simulation's benchmark applies the same filter to its images.
"""

from __future__ import annotations

import numpy as np

from common.config import DENOISE_CHOICES, ConfigError


def check_denoise(name: str) -> str:
    """``name`` if it is a known step, else :class:`ConfigError` listing them (exit 2)."""
    if name not in DENOISE_CHOICES:
        raise ConfigError(f"denoise = {name!r}: one of {', '.join(DENOISE_CHOICES)}")
    return name


def median_filter(frame: np.ndarray, k: int) -> np.ndarray:
    """(H, W) → (H, W), each pixel the median of its k×k neighbourhood (edges replicated), same dtype."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"the median window must be odd and positive, got {k}")
    pad = k // 2
    padded = np.pad(frame, pad, mode="edge")  # (H+2p, W+2p)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))  # (H, W, k, k)
    out: np.ndarray = np.median(windows.reshape(*frame.shape, k * k), axis=-1).astype(frame.dtype)  # (H, W)
    return out


def denoise(frame: np.ndarray, name: str) -> np.ndarray:
    """Apply step ``name`` (:data:`DENOISE_CHOICES`) to one (H, W) frame."""
    if check_denoise(name) == "none":
        return frame
    return median_filter(frame, int(name.removeprefix("median")))


def salt_and_pepper(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Impulse noise: a share ``amount`` of the pixels of ``images`` (any shape, any dtype) set to the
    array's darkest or brightest value (half each), the same dtype."""
    if not 0 <= amount <= 1:
        raise ValueError(f"the share of corrupted pixels must be in [0, 1], got {amount}")
    hit = rng.random(images.shape) < amount
    salt = rng.random(images.shape) < 0.5
    low, high = images.min(), images.max()
    return np.where(hit, np.where(salt, high, low), images).astype(images.dtype)
