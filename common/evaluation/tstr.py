"""TSTR and TRTR: is a classifier trained on synthetic images as good on real ones as one trained on real?

Train on synthetic, test on real (TSTR; Esteban, Hyland, Rätsch 2017): a classifier is trained
only on class-conditional synthetic images and scored on the real test split. The same
classifier (architecture, config, seed) trained on the real training split and scored on the
same test split gives TRTR, the yardstick. Both go through one function, so real images passed
as "synthetic" give exactly the TRTR figures.

Scores: accuracy (arg-max class) and ROC AUC (scikit-learn) — for two classes the AUC of the
positive class probability, for more the unweighted mean of one-vs-rest AUCs over the classes
the test split holds (MedMNIST v2's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.evaluation.classifier import ClassifierConfig, SmallCNN, predict_proba, train_classifier

TSTR_CONFIG = ClassifierConfig(width=16, epochs=10, batch_size=128, lr=1e-3, shift=2, seed=7, check_every=20)


@dataclass(frozen=True)
class ClassifierScore:
    """Accuracy and ROC AUC of a classifier on the real test split."""

    accuracy: float
    auc: float


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the ``positive`` mask (scikit-learn's ``roc_auc_score``): P(pos > neg) + ½ P(tie).

    NaN when one class is absent (scikit-learn refuses that case; a test split may lack a class).
    """
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return float("nan")
    return float(roc_auc_score(pos, scores))


def auc(proba: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUC of class 1's probability; multi-class: mean one-vs-rest AUC over present classes."""
    if proba.shape[1] == 2:
        return binary_auc(proba[:, 1], labels == 1)
    values = [binary_auc(proba[:, c], labels == c) for c in range(proba.shape[1])]
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def train_and_score(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    cfg: ClassifierConfig = TSTR_CONFIG,
    *,
    desc: str = "classifier",
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> ClassifierScore:
    """Train on (train_images, train_labels), score on the test split. TSTR and TRTR both use this.

    ``validation`` (real images, labels), when given, picks the epoch with the best AUC on it
    (never on the test split): a classifier trained on synthetic images drifts towards their
    artefacts as it trains on, so the last epoch is a noisy pick.
    """
    select = None
    if validation is not None:
        val_images, val_labels = validation

        def select(model: SmallCNN) -> float:
            return auc(predict_proba(model, val_images), val_labels)

    model = train_classifier(train_images, train_labels, num_classes, cfg, desc=desc, select=select)
    proba = predict_proba(model, test_images)
    accuracy = float((proba.argmax(axis=1) == test_labels).mean())
    return ClassifierScore(accuracy=accuracy, auc=auc(proba, test_labels))


def balanced_labels(n: int, shares: np.ndarray, seed: int = 0) -> np.ndarray:
    """``n`` class labels (shuffled) whose counts follow ``shares`` (largest-remainder rounding)."""
    if n < 1 or shares.ndim != 1 or not np.isclose(shares.sum(), 1.0) or (shares < 0).any():
        raise ValueError(f"need n >= 1 and shares summing to 1, got n={n}, shares={shares}")
    exact = shares * n
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    labels = np.repeat(np.arange(shares.size, dtype=np.int64), counts)
    return np.random.default_rng(seed).permutation(labels)
