"""The warm-start release at a hospital: its noise multiplier and the Gaussian mechanism itself.

Apart from ``common.dp.embedding`` (features, targets, pre-training) because this part needs the
accountant and the cryptographic noise source, i.e. Opacus, which the server never loads: Opacus
configures the root logger when imported, and the ServerApp's round lines would go silent.
"""

from __future__ import annotations

import numpy as np

from common.dp.accounting import Charge, PrivacyBudgetExceeded, calibrate_noise_multiplier, epsilon_of
from common.dp.embedding import patient_sum
from common.dp.noise import ChaCha20Gaussian
from common.dp.warm_start import EmbeddingSpec


def release_noise_multiplier(history: list[Charge], *, budget: float, share: float, delta: float,
                             accountant: str) -> float:
    """σ of the release: it takes ε from what is spent to spent + ``share`` × (budget − spent).

    On a fresh ledger that is ``share`` of the budget; a hospital that already spent some of its
    budget in earlier runs gives the release the same share of what is left. The DP-SGD rounds
    are then calibrated on top of the ledger, release included, so the run still ends at, never
    above, the budget. ``PrivacyBudgetExceeded`` when nothing is left.
    """
    spent = epsilon_of(history, delta, accountant) if history else 0.0
    if spent >= budget:
        raise PrivacyBudgetExceeded(spent, spent, budget)
    return calibrate_noise_multiplier(history, sample_rate=1.0, planned_steps=1, delta=delta,
                                      budget=spent + share * (budget - spent), accountant=accountant)


def noisy_release(spec: EmbeddingSpec, images: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                  sigma: float, noise: ChaCha20Gaussian) -> np.ndarray:
    """The Gaussian mechanism: Σ_patients v + N(0, σ²·I), (spec.size,) float64. Sensitivity 1."""
    return patient_sum(spec, images, labels, patients) + sigma * noise.standard_normal(spec.size)
