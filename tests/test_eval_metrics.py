"""Distances between image sets and the memorization check, on sets whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.evaluation.metrics import frechet_distance, kernel_distance, memorization, precision_recall
from common.evaluation.tstr import auc, balanced_labels, binary_auc


def _features(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_fd_of_a_set_against_itself_is_zero() -> None:
    # prepare
    a = _features()
    # act
    fd = frechet_distance(a, a)
    # assert
    assert fd == pytest.approx(0.0, abs=1e-9)


def test_fd_golden_values_for_a_shift_and_a_scaling() -> None:
    # prepare: same covariance, mean moved by (3, 4, 0, …): FD = |μ|² = 25 exactly
    a = _features()
    shift = np.zeros(a.shape[1])
    shift[:2] = (3.0, 4.0)
    # act
    fd_shift = frechet_distance(a, a + shift)
    fd_scaled = frechet_distance(a, 2.0 * a)  # |μ|² + Tr(Σ + 4Σ − 2·2Σ) = |μ|² + Tr Σ
    # assert
    assert fd_shift == pytest.approx(25.0, rel=1e-9)
    expected = float((a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert fd_scaled == pytest.approx(expected, rel=1e-9)


def test_fd_grows_with_added_noise() -> None:
    # prepare
    a = _features()
    rng = np.random.default_rng(1)
    # act
    fds = [frechet_distance(a, a + s * rng.normal(size=a.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    # assert
    assert fds == sorted(fds) and fds[0] < 0.2 < fds[-1]


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another() -> None:
    # prepare
    a, b = _features(seed=0), _features(seed=1)
    # act
    same, _ = kernel_distance(a, b, subsets=20, subset_size=200)
    moved, _ = kernel_distance(a, b + 1.0, subsets=20, subset_size=200)
    # assert: unbiased, so one distribution gives ≈ 0 (either sign)
    assert abs(same) < 0.05
    assert moved > 1.0


def test_precision_recall_golden_cases() -> None:
    # prepare
    a = _features()
    far = a + 100.0
    # act
    same = precision_recall(a, a.copy())
    apart = precision_recall(a, far)
    # assert
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    assert same.density == pytest.approx(1.0, abs=0.3)
    assert (apart.precision, apart.recall, apart.density, apart.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_precision_recall_rank_held_out_over_noisier_sets_over_pure_noise() -> None:
    # prepare: "domain features" like the extractor's: 8 strong factors in 128 dimensions plus a
    # faint spread; held-out real, real with feature noise 0.05 and 0.08, and pure noise
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 128))

    def draw(n: int) -> np.ndarray:
        out: np.ndarray = rng.normal(size=(n, 8)) @ mix + 0.1 * rng.normal(size=(n, 128))
        return out

    real, held = draw(500), draw(500)
    small = draw(500) + 0.05 * rng.normal(size=(500, 128))
    heavy = draw(500) + 0.08 * rng.normal(size=(500, 128))
    noise = rng.uniform(-3, 3, size=(500, 128))
    # act
    scores = [precision_recall(real, fake) for fake in (held, small, heavy, noise)]
    # assert: every figure ranks the four sets in order, with these values (k = 5, 8 axes + residual)
    for name in ("precision", "recall", "density", "coverage"):
        values = [getattr(f, name) for f in scores]
        assert values == sorted(values, reverse=True) and values[0] > values[1] > values[2] > values[3], name
    assert [f.precision for f in scores] == pytest.approx([0.924, 0.768, 0.336, 0.0])
    assert [f.recall for f in scores] == pytest.approx([0.93, 0.788, 0.528, 0.0])
    assert [f.density for f in scores] == pytest.approx([0.9916, 0.5896, 0.1072, 0.0])
    assert [f.coverage for f in scores] == pytest.approx([0.976, 0.66, 0.106, 0.0])
    # in all 128 dimensions the added noise is lost among the strong factors' distances: the
    # noisier set scores like held-out real images, which the residual coordinate tells apart
    assert precision_recall(real, heavy, components=None).precision == pytest.approx(0.93)


def test_memorization_copies_score_high_and_noise_low() -> None:
    # prepare: "training" and "held-out" images from one distribution (smooth blobs), 16×16
    rng = np.random.default_rng(0)
    grid = np.linspace(-1, 1, 16)
    xx, yy = np.meshgrid(grid, grid)

    def blobs(n: int) -> np.ndarray:
        cx, cy = rng.uniform(-0.6, 0.6, (2, n, 1, 1))
        out: np.ndarray = (2 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.1) - 1).reshape(n, 1, 16, 16)
        return out

    train, held = blobs(200), blobs(200)
    copier = train[rng.choice(200, 100)]  # a generator that returns training images
    noise = rng.uniform(-1, 1, (100, 1, 16, 16))  # a generator that returns noise
    fresh = blobs(100)  # a generator that learnt the distribution, not the images
    # act
    m_copy = memorization(copier, train, held)
    m_noise = memorization(noise, train, held)
    m_fresh = memorization(fresh, train, held)
    # assert
    assert m_copy.rate == 1.0 and m_copy.nearer_share == 1.0
    assert m_noise.rate == 0.0
    # one that learnt the distribution: nearer to train about half the time (equal set sizes), and
    # flagged only where two of these low-dimensional blobs happen to nearly coincide
    assert m_fresh.nearer_share == pytest.approx(0.5, abs=0.1)
    assert m_fresh.rate == pytest.approx(0.15)
    assert m_copy.d_train.max() < 1e-5  # zero up to the round-off of |a|² + |b|² − 2a·b
    assert m_noise.closest(1)[0] == int(np.argmin(m_noise.d_train / m_noise.d_held))


def test_auc_golden_values() -> None:
    # prepare / act / assert: the textbook example, ties, and one-vs-rest
    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]) == 1) == 0.75
    assert binary_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1]) == 1) == 0.5
    proba = np.eye(3)[[0, 1, 2, 0]]
    assert auc(proba, np.array([0, 1, 2, 0])) == 1.0
    assert np.isnan(binary_auc(np.array([0.2, 0.3]), np.array([True, True])))


def test_balanced_labels_follow_the_shares_exactly() -> None:
    # act
    labels = balanced_labels(10, np.array([0.25, 0.75]), seed=3)
    # assert: 2.5/7.5 → largest remainder gives 3/7 (ties → lower class first)
    assert np.bincount(labels).tolist() == [3, 7]
    assert np.bincount(balanced_labels(4708, np.array([1214, 3494]) / 4708)).tolist() == [1214, 3494]


def test_the_classifier_is_scored_every_check_and_the_best_point_kept() -> None:
    # prepare: 10 images in batches of 2 (5 steps an epoch), 2 epochs; a score that peaks at the 3rd check
    from common.evaluation.classifier import ClassifierConfig, train_classifier

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32)
    labels = np.arange(10) % 2
    calls: list[dict[str, torch.Tensor]] = []

    def score(model: torch.nn.Module) -> float:
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return [0.1, 0.2, 0.9, 0.3, 0.4, 0.5][len(calls) - 1]

    cfg = ClassifierConfig(width=4, epochs=2, batch_size=2, check_every=2, seed=1)
    # act
    kept = train_classifier(images, labels, 2, cfg, select=score)
    # assert: steps 2, 4, then the epoch's end (5); 7, 9, then 10: six checks, the third kept
    assert len(calls) == 6
    for key, value in kept.state_dict().items():
        torch.testing.assert_close(value, calls[2][key])
    with pytest.raises(ValueError, match="check_every"):
        ClassifierConfig(check_every=-1)
