"""The public shape of the warm-start release (``common.dp.embedding``), without torch.

Light on purpose: the secure-aggregation code of a hospital answering a key exchange needs the
release's size and bounds, not the libraries that compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ModelConfig, RunConfig, WarmStartConfig

COARSE, FOURIER, COUNT = 0.6, 0.6, 0.5  # per-part scales: 0.36 + 0.36 + 0.25 ≤ 1
COARSE_SIDE, FOURIER_SIDE = 8, 16  # pooled sides of the two parts
WARM_START_ROUND = 0  # the release is "round 0" of a run: before the first GAN round
# |value| bound of a released coordinate in the secure sum: a class's count slot is 0.5 per
# patient, a feature ≤ 0.6, plus noise; a hospital of up to ~10⁶ patients fits (48-bit levels
# then resolve 7e-9).
RELEASE_BOUND = 1e6


@dataclass(frozen=True)
class EmbeddingSpec:
    """The public shape of the release: image side, classes, random frequencies, their seed."""

    image_size: int
    num_classes: int
    frequencies: int = 500  # D: the Fourier part has 2·D values
    seed: int = 0
    channels: int = 1  # 2 for image–mask pairs: both channels are embedded, jointly

    @property
    def feature_dim(self) -> int:
        """Length of φ(x) (without the count slot)."""
        return self.channels * COARSE_SIDE**2 + 2 * self.frequencies

    @property
    def size(self) -> int:
        """Length of the released vector: per class φ and one count."""
        return self.num_classes * (self.feature_dim + 1)

    @staticmethod
    def of(run: RunConfig) -> EmbeddingSpec:
        """The run's spec: every hospital and the server derive the same public features."""
        return EmbeddingSpec.of_parts(run.model, run.warm_start, run.federation.seed)

    @staticmethod
    def of_parts(model: ModelConfig, warm_start: WarmStartConfig, seed: int) -> EmbeddingSpec:
        """The same spec from a run's parts (the in-process simulation keeps those, not the run)."""
        return EmbeddingSpec(model.image_size, model.num_classes, warm_start.frequencies, seed=seed,
                             channels=model.channels)
