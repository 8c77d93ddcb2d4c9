"""Distances between a synthetic and a real image set, and the memorization check.

All functions are plain numpy on float64 and deterministic (any subsampling takes a seed).

* Fréchet distance (Heusel et al., "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium", NeurIPS 2017): ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2 (Σ_r Σ_s)^½) between
  Gaussians fitted to the two feature sets. Biased upward for small sets; compare like with like.
* Kernel inception distance (Bińkowski, Sutherland, Arbel, Gretton, "Demystifying MMD GANs",
  ICLR 2018): the unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³,
  averaged over random subsets. Unbiased, so usable with a few hundred images.
* Precision and recall (Kynkäänniemi et al., "Improved precision and recall metric for assessing
  generative models", NeurIPS 2019): the share of synthetic samples inside the real k-NN
  manifold, and of real samples inside the synthetic one; density and coverage (Naeem et al.,
  "Reliable fidelity and diversity metrics for generative models", ICML 2020) from the same balls.
* Memorization: for each synthetic image, the distance to its nearest real *training* image
  against the distance to its nearest real *held-out* image (pixel space). A generator that
  copies training images has the first near zero; one that generalises has both alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def _check_features(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 rows")


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues → 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    root: np.ndarray = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return root


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FD between Gaussians fitted to (N, D) and (M, D) features.

    Tr((Σ_r Σ_s)^½) is computed as Tr((Σ_r^½ Σ_s Σ_r^½)^½): the same eigenvalues, but a
    symmetric matrix, so ``eigh`` is exact and no complex round-off appears.
    """
    _check_features(real, fake)
    mu_r, mu_s = real.mean(axis=0), fake.mean(axis=0)
    cov_r, cov_s = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root_r = _sqrt_psd(cov_r)
    inner = root_r @ cov_s @ root_r
    w = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    fd = float(((mu_r - mu_s) ** 2).sum() + np.trace(cov_r) + np.trace(cov_s) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kernel_distance(
    real: np.ndarray, fake: np.ndarray, *, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased MMD² over ``subsets`` random subsets of each set."""
    _check_features(real, fake)
    rng = np.random.default_rng(seed)
    m = min(subset_size, real.shape[0], fake.shape[0])
    values = [
        _mmd2_unbiased(real[rng.choice(real.shape[0], m, replace=False)],
                       fake[rng.choice(fake.shape[0], m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _sq_dists(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """(start, squared Euclidean distances (rows, M)) for row chunks of ``a`` against all of ``b``."""
    b2 = (b * b).sum(axis=1)
    for i in range(0, a.shape[0], chunk):
        block = a[i : i + chunk]
        d2 = (block * block).sum(axis=1)[:, None] + b2[None, :] - 2.0 * block @ b.T
        yield i, np.clip(d2, 0.0, None)


def nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``: (Euclidean distance to, index of) its nearest row of ``b``."""
    dist = np.empty(a.shape[0])
    index = np.empty(a.shape[0], dtype=np.int64)
    for i, d2 in _sq_dists(a, b):
        index[i : i + d2.shape[0]] = d2.argmin(axis=1)
        dist[i : i + d2.shape[0]] = np.sqrt(d2.min(axis=1))
    return dist, index


def _kth_nn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row."""
    radii = np.empty(x.shape[0])
    for i, d2 in _sq_dists(x, x):
        radii[i : i + d2.shape[0]] = np.sqrt(np.partition(d2, k, axis=1)[:, k])  # column 0 is itself
    return radii


@dataclass(frozen=True)
class Fidelity:
    """Precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020), all in [0, 1] (density ≥ 0)."""

    precision: float
    recall: float
    density: float
    coverage: float


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> Fidelity:
    """k-NN manifold estimates of fidelity (precision, density) and diversity (recall, coverage)."""
    _check_features(real, fake)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    in_real_balls = np.zeros(fake.shape[0], dtype=np.int64)  # how many real balls hold each fake
    covered = np.zeros(real.shape[0], dtype=bool)
    for i, d2 in _sq_dists(fake, real):
        inside = d2 <= (r_real**2)[None, :]  # (chunk, N)
        in_real_balls[i : i + d2.shape[0]] = inside.sum(axis=1)
        covered |= inside.any(axis=0)
    recall_hits = np.zeros(real.shape[0], dtype=bool)
    for i, d2 in _sq_dists(real, fake):
        recall_hits[i : i + d2.shape[0]] = (d2 <= (r_fake**2)[None, :]).any(axis=1)
    return Fidelity(
        precision=float((in_real_balls > 0).mean()),
        recall=float(recall_hits.mean()),
        density=float(in_real_balls.sum() / (k * fake.shape[0])),
        coverage=float(covered.mean()),
    )


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
    """Nearest-neighbour distances in pixel space of images (N, ...) flattened to vectors."""
    if not 0 < ratio <= 1:
        raise ValueError(f"memorization ratio must be in (0, 1], got {ratio}")
    flat = [np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1) for x in (fake, train, held_out)]
    if min(x.shape[0] for x in flat) < 1:
        raise ValueError("memorization needs synthetic, training and held-out images")
    d_train, i_train = nearest(flat[0], flat[1])
    d_held, i_held = nearest(flat[0], flat[2])
    return Memorization(d_train, i_train, d_held, i_held, ratio)
