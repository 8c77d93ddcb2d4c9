"""Distances between a synthetic and a real image set, and the memorization check.

The distances come from the libraries the field uses, on features computed elsewhere (the domain
extractor of ``common.evaluation.features``); each function takes (N, D) float arrays:

* Fréchet distance (Heusel et al., "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium", NeurIPS 2017): ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2 (Σ_r Σ_s)^½) between
  Gaussians fitted to the two feature sets, by torchmetrics' ``FrechetInceptionDistance`` fed
  the features through an identity "extractor" (nothing is downloaded). Biased upward for small
  sets; compare like with like.
* Kernel inception distance (Bińkowski, Sutherland, Arbel, Gretton, "Demystifying MMD GANs",
  ICLR 2018): the unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³ by
  torchmetrics' ``poly_mmd``, averaged over random subsets drawn here from a seed (torchmetrics'
  own metric class draws them from torch's global generator). Unbiased, so usable with a few
  hundred images.
* Precision and recall (Kynkäänniemi et al., "Improved precision and recall metric for assessing
  generative models", NeurIPS 2019) and density and coverage (Naeem, Oh, Uh, Choi, Yoo,
  "Reliable fidelity and diversity metrics for generative models", ICML 2020) by the authors'
  ``prdc`` package, with k = 5 (both papers' choice) on the real features' first 8 principal
  axes, whitened, plus the distance from them (scikit-learn's PCA; see :func:`precision_recall`).
* Memorization: for each synthetic image, the distance to its nearest real *training* image
  against the distance to its nearest real *held-out* image (pixel space). A generator that
  copies training images has the first near zero; one that generalises has both alike.

The libraries are imported inside the functions: ``medsynth`` imports this module only for
``evaluate``, and every other command starts without them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRDC_K = 5  # k of the k-NN balls: Kynkäänniemi et al. 2019 and Naeem et al. 2020 both use 5
PRDC_COMPONENTS = 8  # principal axes of the real features the k-NN balls live in (see precision_recall)


def _check_features(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 rows")


class _Given(nn.Module):
    """The "feature extractor" torchmetrics calls: the features are computed already, (B, D) → (B, D)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads the feature width from here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FD between Gaussians fitted to (N, D) and (M, D) features (torchmetrics, float64).

    A set against itself gives 0 up to round-off of order 1e-12, clipped at 0 (FD ≥ 0).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return max(float(metric.compute()), 0.0)


def kernel_distance(
    real: np.ndarray, fake: np.ndarray, *, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased MMD² over ``subsets`` random subsets of each set (torchmetrics' kernel)."""
    from torchmetrics.image.kid import poly_mmd

    _check_features(real, fake)
    rng = np.random.default_rng(seed)
    m = min(subset_size, real.shape[0], fake.shape[0])
    r, f = torch.from_numpy(np.asarray(real, dtype=np.float64)), torch.from_numpy(np.asarray(fake, dtype=np.float64))
    values = [
        float(poly_mmd(r[rng.choice(real.shape[0], m, replace=False)], f[rng.choice(fake.shape[0], m, replace=False)]))
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


@dataclass(frozen=True)
class Fidelity:
    """Precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020), all in [0, 1] (density ≥ 0)."""

    precision: float
    recall: float
    density: float
    coverage: float


def principal_axes(real: np.ndarray, fake: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sets as (``components`` + 1) coordinates: the real features' first principal axes, whitened,
    and the distance from that subspace, standardised.

    scikit-learn's ``PCA(whiten=True)`` is fitted on the real features only (full SVD: no random
    state), so one map, fixed by the real images, measures every generator. The last coordinate,
    the norm of what the axes leave out (the residual, centred and scaled by the real set's),
    keeps a set that differs from the real one only off those axes from projecting into the
    middle of the real manifold (the residual statistic of PCA monitoring, Jackson & Mudholkar 1979).
    """
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, whiten=True, svd_solver="full").fit(real)

    def coordinates(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = pca.transform(x)  # (N, components)
        return z, np.linalg.norm(x - pca.inverse_transform(z), axis=1)  # (N,) residual norms

    (z_real, r_real), (z_fake, r_fake) = coordinates(real), coordinates(fake)
    centre, scale = r_real.mean(), max(float(r_real.std()), 1e-12)
    return (np.column_stack([z_real, (r_real - centre) / scale]),
            np.column_stack([z_fake, (r_fake - centre) / scale]))


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = PRDC_K, components: int | None = PRDC_COMPONENTS
) -> Fidelity:
    """k-NN manifold estimates of fidelity (precision, density) and diversity (recall, coverage), by ``prdc``.

    A real sample's ball reaches its k-th nearest real neighbour; precision is the share of
    synthetic samples inside some real ball, recall the share of real samples inside some
    synthetic ball, density the mean number of real balls holding a synthetic sample over k,
    coverage the share of real balls holding at least one synthetic sample. Coverage needs sets
    of about equal size (the evaluation draws as many synthetic images as real ones).

    ``k`` = 5 as in both papers. ``components``: the balls are drawn in the real features' first
    ``components`` principal axes, whitened, plus the distance from them (:func:`principal_axes`;
    None: in all D dimensions). In the domain extractor's 128 dimensions the real manifold is so
    thin that anything not a real image falls outside every ball: on PneumoniaMNIST, real images
    plus Gaussian pixel noise of σ = 0.1 (a domain FD of 34, like the GANs of the quality
    benchmark) have precision 0.00 at k = 5 (0.08 at k = 20), and every generator scored 0. In
    the 8 axes that hold 96 % of the real features' variance plus the residual, the same sets
    rank real held-out > σ 0.02 > 0.05 > 0.1 > 0.2 (precision 0.97, 0.94, 0.70, 0.46, 0.00) and
    pure noise scores 0; docs/evaluation.md has the measurements. prdc prints the set sizes on
    stdout; that line is captured and dropped (the evaluation reports its own).
    """
    from prdc import compute_prdc

    _check_features(real, fake)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    if components is not None and components < min(real.shape):
        real, fake = principal_axes(real, fake, components)
    with contextlib.redirect_stdout(io.StringIO()):
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return Fidelity(precision=float(out["precision"]), recall=float(out["recall"]), density=float(out["density"]),
                    coverage=float(out["coverage"]))


@dataclass(frozen=True, eq=False)
class Memorization:
    """Per synthetic image: distance to and index of the nearest training and held-out image.

    ``rate``: share of synthetic images with d_train < ratio · d_held_out, i.e. markedly nearer
    to a training image than any held-out image is. ``nearer_share``: the same with ratio 1; for
    a generator that never saw the training images it is about n_train / (n_train + n_held) at
    most (more images, nearer neighbours), so only the margin of ``rate`` flags copies.
    """

    d_train: np.ndarray
    i_train: np.ndarray
    d_held: np.ndarray
    i_held: np.ndarray
    ratio: float

    @property
    def rate(self) -> float:
        return float((self.d_train < self.ratio * self.d_held).mean())

    @property
    def nearer_share(self) -> float:
        return float((self.d_train < self.d_held).mean())

    def closest(self, n: int) -> np.ndarray:
        """Indices of the ``n`` synthetic images with the smallest d_train / d_held."""
        score = self.d_train / np.maximum(self.d_held, 1e-12)
        return np.argsort(score, kind="stable")[:n]


def memorization(
    fake: np.ndarray, train: np.ndarray, held_out: np.ndarray, *, ratio: float = 0.5
) -> Memorization:
    """Nearest-neighbour distances in pixel space of images (N, ...) flattened to vectors (scikit-learn)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    if not 0 < ratio <= 1:
        raise ValueError(f"memorization ratio must be in (0, 1], got {ratio}")
    flat = [np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1) for x in (fake, train, held_out)]
    if min(x.shape[0] for x in flat) < 1:
        raise ValueError("memorization needs synthetic, training and held-out images")
    i_train, d_train = pairwise_distances_argmin_min(flat[0], flat[1])  # (N,), (N,): Euclidean
    i_held, d_held = pairwise_distances_argmin_min(flat[0], flat[2])
    return Memorization(d_train, i_train, d_held, i_held, ratio)
