"""The warm-start release at a hospital: the Gaussian mechanism itself (its σ: ``common.dp.plan``).

Apart from ``common.dp.embedding`` (features, targets, pre-training) because this part needs the
accountant and the cryptographic noise source, i.e. Opacus, which the server never loads: Opacus
configures the root logger when imported, and the ServerApp's round lines would go silent.
"""

from __future__ import annotations

import numpy as np

from common.dp.embedding import patient_sum
from common.dp.noise import ChaCha20Gaussian
from common.dp.warm_start import EmbeddingSpec


def noisy_release(spec: EmbeddingSpec, images: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                  sigma: float, noise: ChaCha20Gaussian) -> np.ndarray:
    """The Gaussian mechanism: Σ_patients v + N(0, σ²·I), (spec.size,) float64. Sensitivity 1."""
    return patient_sum(spec, images, labels, patients) + sigma * noise.standard_normal(spec.size)
