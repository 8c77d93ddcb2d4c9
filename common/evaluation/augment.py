"""Does a hospital's own classifier gain from synthetic images of its rare class? Four arms, one protocol.

A hospital trains the project's classifier (``common.evaluation.classifier``: the seeded
:class:`SmallCNN`, the epoch or step picked on a validation split) on its own images four ways
and scores each on the same held-out patients:

* ``real``: its real images only;
* ``classic``: the same images with classic augmentation drawn afresh for every batch
  (horizontal flip, rotation up to ``rotation_deg``, brightness and contrast jitter), on top of the
  classifier's own random shift;
* ``oversample``: real images plus ``extra`` rare-class images drawn with replacement from its
  real rare-class images (random minority oversampling);
* ``synthetic``: real images plus ``extra`` synthetic images of the rare class (from the
  federation's DP generator, ``client.augment``);
* optionally ``synthetic-all``: real images plus ``extra`` synthetic images of *every* class, so
  that synthetic images are not all of one class (a classifier could otherwise learn "looks
  synthetic" as a cue for the rare class); the rare class gains as in ``synthetic``, the others
  as many.

``oversample`` and ``synthetic`` add the same number of rare-class images, so they differ only
in where the images come from. Every arm uses the same training patients, validation patients,
test images, classifier settings and seed (:func:`compare_arms` takes them once).

Scores on the test images: balanced accuracy (mean per-class sensitivity), each class's
sensitivity (recall) and specificity (one-vs-rest true negative rate), ROC AUC
(``common.evaluation.tstr.auc``), each with a percentile bootstrap 95 % interval over test
*patients* (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993: resample patients with
replacement, keep all their images), and the paired difference of each arm against ``real`` on
the same resamples, which is what a gain claim needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.config import CLASSIFIER_REPEATS
from common.errors import UserError
from common.evaluation.classifier import ClassifierConfig, SmallCNN, predict_proba, train_classifier
from common.evaluation.tstr import auc

ARMS = ("real", "classic", "oversample", "synthetic")
ALL_CLASSES_ARM = "synthetic-all"
ARM_TITLES = {
    "real": "(a) real only",
    "classic": "(b) real + classic augmentation",
    "oversample": "(c) real + minority oversampling",
    "synthetic": "(d) real + synthetic rare class",
    ALL_CLASSES_ARM: "(e) real + synthetic, all classes",
}

#: The hospital classifier: the TSTR architecture (width 16), more epochs and smaller batches because a
#: hospital's set is small (a few hundred images), the step picked on validation every 10 steps.
HOSPITAL_CLASSIFIER = ClassifierConfig(width=16, epochs=20, batch_size=64, lr=1e-3, shift=2, seed=7, check_every=10)


class AugmentError(UserError, ValueError):
    """The comparison cannot be run as asked (too few patients, unknown class, no synthetic images)."""


@dataclass(frozen=True)
class AugmentSettings:
    """What every arm shares: classifier, augmentation strengths, bootstrap, seed of the split and draws."""

    classifier: ClassifierConfig = HOSPITAL_CLASSIFIER
    rotation_deg: float = 10.0  # classic: largest rotation either way
    brightness: float = 0.1  # classic: largest additive shift, in the [-1, 1] pixel range
    contrast: float = 0.1  # classic: largest relative contrast change
    flip: bool = True  # classic: horizontal flip with probability ½
    bootstrap: int = 1000  # resamples of the test patients
    seed: int = 0  # the patient split, the oversampling draw and the bootstrap
    # Classifiers trained per arm, with initialisation and batch-order seeds classifier.seed + 10·j: one small
    # classifier's own training randomness moves a rare class's sensitivity by 10–20 points on the same
    # images (``make bench-augment``), so every score is the mean over the repeats, the same seeds in every arm.
    repeats: int = CLASSIFIER_REPEATS

    def __post_init__(self) -> None:
        if self.rotation_deg < 0 or self.brightness < 0 or not 0 <= self.contrast < 1:
            raise AugmentError("rotation, brightness must be >= 0 and contrast in [0, 1)")
        if self.bootstrap < 0:
            raise AugmentError("bootstrap resamples must be >= 0")
        if self.repeats < 1:
            raise AugmentError("repeats (classifiers trained per arm) must be >= 1")


@dataclass(frozen=True)
class Split:
    """Images (N, 1, S, S) in [-1, 1], labels (N,) int64 and patient indices (N,) int64 of one split."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.labels.shape != (n,) or self.patients.shape != (n,):
            raise AugmentError(f"a split needs images (N, 1, S, S), labels (N,) and patients (N,), got "
                               f"{self.images.shape}, {self.labels.shape}, {self.patients.shape}")

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx], self.patients[idx])

    @property
    def size(self) -> int:
        return int(self.labels.size)


def patient_split(labels: np.ndarray, patients: np.ndarray, shares: Sequence[float], seed: int) -> list[np.ndarray]:
    """Image indices of each part, split by patient (never one patient in two parts), stratified by the
    patient's majority label, seeded. ``shares`` sum to 1; each part gets round(share × patients of a
    label) of every label, the last part the rest."""
    if not math.isclose(sum(shares), 1.0) or any(s <= 0 for s in shares):
        raise AugmentError(f"split shares must be positive and sum to 1, got {list(shares)}")
    rng = np.random.default_rng(seed)
    ids, patient_of = np.unique(patients, return_inverse=True)
    counts = np.zeros((ids.size, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (patient_of, labels), 1)
    majority = counts.argmax(axis=1)
    part_of = np.empty(ids.size, dtype=np.int64)
    for c in np.unique(majority):
        members = rng.permutation(np.flatnonzero(majority == c))
        bounds = np.round(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for k, chunk in enumerate(np.split(members, bounds)):
            part_of[chunk] = k
    image_part = part_of[patient_of]
    return [np.flatnonzero(image_part == k) for k in range(len(shares))]


def rare_class(labels: np.ndarray, num_classes: int) -> int:
    """The class with the fewest training images (lowest index on a tie)."""
    return int(np.argmin(np.bincount(labels, minlength=num_classes)))


def balancing_extra(labels: np.ndarray, num_classes: int, rare: int) -> int:
    """How many rare-class images bring the rare class level with the largest one."""
    counts = np.bincount(labels, minlength=num_classes)
    return int(counts.max() - counts[rare])


def affine_theta(angle: torch.Tensor, zoom: torch.Tensor, shift_x: torch.Tensor,
                 shift_y: torch.Tensor) -> torch.Tensor:
    """``F.affine_grid``'s matrices (B, 2, 3) for a rotation by ``angle`` (B,) radians, a zoom (B,)
    (> 1 magnifies) and a shift (B,) each in normalised coordinates: the map from output to input."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # (B,)
    return torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)


def classic_augment(settings: AugmentSettings) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The batch transform of arm ``classic``: (B, 1, S, S) → (B, 1, S, S), random per image from ``gen``.

    A transform whose strength is 0 draws nothing, so with every strength 0 the arm trains exactly as ``real``.
    """
    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        if settings.flip:
            flip = torch.rand(b, generator=gen) < 0.5  # (B,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if settings.rotation_deg > 0:
            angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(settings.rotation_deg)  # (B,)
            theta = affine_theta(angle, torch.ones(b), torch.zeros(b), torch.zeros(b))  # (B, 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if settings.contrast > 0:
            scale = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * settings.contrast  # (B, 1, 1, 1)
            mean = x.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
            x = (x - mean) * scale + mean
        if settings.brightness > 0:
            x = x + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * settings.brightness
        return x.clamp(-1.0, 1.0)

    return transform


@dataclass(frozen=True)
class Estimate:
    """A score on the test images and its bootstrap 95 % interval over patients (NaN when undefined)."""

    value: float
    low: float
    high: float

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        if not math.isfinite(self.value):
            return "–"
        v, lo, hi = (round(x * scale, digits) for x in (self.value, self.low, self.high))
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(self.low) else f"{v:.{digits}f}"


@dataclass(frozen=True)
class ArmResult:
    """One arm's scores: balanced accuracy, AUC, per-class sensitivity and specificity, and the paired
    difference against arm ``real`` of balanced accuracy and of the rare class's sensitivity."""

    arm: str
    train_images: int
    train_counts: tuple[int, ...]  # images per class the classifier saw (real + added)
    balanced_accuracy: Estimate
    auc: Estimate
    sensitivity: tuple[Estimate, ...]
    specificity: tuple[Estimate, ...]
    delta_balanced_accuracy: Estimate | None = None  # this arm − real, paired bootstrap
    delta_rare_sensitivity: Estimate | None = None
    rare_sensitivity_runs: tuple[float, ...] = ()  # the rare class's sensitivity of each repeat, on all test images

    def to_json(self) -> dict[str, Any]:
        def e(x: Estimate | None) -> list[float] | None:
            return None if x is None else [x.value, x.low, x.high]

        return {"arm": self.arm, "train_images": self.train_images, "train_counts": list(self.train_counts),
                "balanced_accuracy": e(self.balanced_accuracy), "auc": e(self.auc),
                "sensitivity": [e(s) for s in self.sensitivity], "specificity": [e(s) for s in self.specificity],
                "delta_balanced_accuracy": e(self.delta_balanced_accuracy),
                "delta_rare_sensitivity": e(self.delta_rare_sensitivity),
                "rare_sensitivity_runs": list(self.rare_sensitivity_runs)}


@dataclass(frozen=True)
class Comparison:
    """The arms of one hospital on one test set, and what they shared."""

    class_names: tuple[str, ...]
    rare: int
    extra: int  # rare-class images added by oversample and synthetic
    train_counts: tuple[int, ...]  # real training images per class
    val_images: int
    test_images: int
    test_patients: int
    settings: AugmentSettings
    arms: tuple[ArmResult, ...] = field(default_factory=tuple)

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.arm == name:
                return a
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "rare": self.class_names[self.rare], "extra": self.extra,
                "train_counts": list(self.train_counts), "val_images": self.val_images,
                "test_images": self.test_images, "test_patients": self.test_patients,
                "classifier": vars(self.settings.classifier),
                "bootstrap": self.settings.bootstrap, "seed": self.settings.seed, "repeats": self.settings.repeats,
                "arms": [a.to_json() for a in self.arms]}

    def format(self) -> str:
        """A Markdown table: one row per arm; percentages with 95 % bootstrap intervals over test patients,
        each the mean of the arm's repeated classifiers (their rare-class sensitivities in the last column)."""
        rare = self.class_names[self.rare]
        head = (f"| arm | train images | balanced acc. | AUC | sensitivity {rare} (rare) | Δ sens. {rare} vs (a) | "
                + " | ".join(f"sens. {n}" for i, n in enumerate(self.class_names) if i != self.rare)
                + f" | spec. {rare} | sens. {rare}, each of {self.settings.repeats} classifiers |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for a in self.arms:
            delta = a.delta_rare_sensitivity.format() if a.delta_rare_sensitivity is not None else "–"
            others = " | ".join(a.sensitivity[i].format() for i in range(len(self.class_names)) if i != self.rare)
            runs = " / ".join(f"{v * 100:.1f}" for v in a.rare_sensitivity_runs)
            lines.append(f"| {ARM_TITLES[a.arm]} | {a.train_images} | {a.balanced_accuracy.format()} | "
                         f"{a.auc.format(1.0, 3)} | {a.sensitivity[self.rare].format()} | {delta} | {others} | "
                         f"{a.specificity[self.rare].format()} | {runs} |")
        return "\n".join(lines)


def scores(proba: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Balanced accuracy, AUC, per-class sensitivity and specificity of probabilities (N, C) for labels (N,)."""
    pred = proba.argmax(axis=1)
    sens, spec = [], []
    for c in range(num_classes):
        pos, neg = labels == c, labels != c
        sens.append(float((pred[pos] == c).mean()) if pos.any() else float("nan"))
        spec.append(float((pred[neg] != c).mean()) if neg.any() else float("nan"))
    present = [s for s in sens if math.isfinite(s)]
    return {"balanced_accuracy": float(np.mean(present)) if present else float("nan"),
            "auc": auc(proba, labels), "sensitivity": sens, "specificity": spec}


def mean_scores(probas: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """:func:`scores` of each repeat's probabilities (N, C), averaged score by score over the repeats."""
    each = [scores(p, labels, num_classes) for p in probas]
    if len(each) == 1:
        return each[0]

    def mean(values: Sequence[float]) -> float:
        return float(np.mean(values))

    return {"balanced_accuracy": mean([s["balanced_accuracy"] for s in each]), "auc": mean([s["auc"] for s in each]),
            "sensitivity": [mean([s["sensitivity"][c] for s in each]) for c in range(num_classes)],
            "specificity": [mean([s["specificity"][c] for s in each]) for c in range(num_classes)]}


def _bootstrap_indices(patients: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Image indices of each resample: test patients drawn with replacement, all images of each kept."""
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(ids.size)]
    if all(m.size == 1 for m in members):  # one image per patient: a plain resample of images
        flat = np.array([m[0] for m in members])
        return [flat[rng.integers(0, ids.size, ids.size)] for _ in range(resamples)]
    return [np.concatenate([members[k] for k in rng.integers(0, ids.size, ids.size)]) for _ in range(resamples)]


def _interval(values: Sequence[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def oversample_picks(labels: np.ndarray, rare: int, extra: int, seed: int) -> np.ndarray:
    """Indices of the ``extra`` rare-class training images arm ``oversample`` repeats (drawn with replacement)."""
    pool = np.flatnonzero(labels == rare)
    return np.random.default_rng(seed + 17).choice(pool, size=extra, replace=True)


def arm_training_set(arm: str, train: Split, rare: int, extra: int, synthetic: Mapping[int, np.ndarray],
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 1, S, S) and labels (N,) arm ``arm`` trains on."""
    if arm in ("real", "classic"):
        return train.images, train.labels
    if arm == "oversample":
        pick = oversample_picks(train.labels, rare, extra, seed)
        return np.concatenate([train.images, train.images[pick]]), np.concatenate([train.labels, train.labels[pick]])
    if arm == "synthetic":
        added = {rare: synthetic[rare][:extra]}
    elif arm == ALL_CLASSES_ARM:
        added = {c: imgs[:extra] for c, imgs in sorted(synthetic.items())}
    else:
        raise AugmentError(f"unknown arm {arm!r}; arms are {', '.join((*ARMS, ALL_CLASSES_ARM))}")
    images = [train.images] + [a.astype(np.float32) for a in added.values()]
    labels = [train.labels] + [np.full(a.shape[0], c, dtype=np.int64) for c, a in added.items()]
    return np.concatenate(images), np.concatenate(labels)


def compare_arms(train: Split, val: Split, test: Split, num_classes: int, class_names: Sequence[str], *,
                 synthetic: Mapping[int, np.ndarray], rare: int | None = None, extra: int | None = None,
                 arms: Sequence[str] = ARMS, settings: AugmentSettings = AugmentSettings()) -> Comparison:
    """Train ``settings.repeats`` classifiers per arm on ``train`` (+ what the arm adds), pick each one's step
    on ``val``'s balanced accuracy, score them on ``test`` (the mean over the repeats), with bootstrap
    intervals over ``test``'s patients.

    ``synthetic`` maps a class to synthetic images (M, 1, S, S) in [-1, 1]; arm ``synthetic`` needs at
    least ``extra`` of the rare class. ``rare`` defaults to the class with the fewest training images,
    ``extra`` to the count that levels it with the largest class.
    """
    if len(class_names) != num_classes:
        raise AugmentError(f"{len(class_names)} class names for {num_classes} classes")
    for name, split in (("training", train), ("validation", val), ("test", test)):
        if split.size == 0:
            raise AugmentError(f"the {name} split is empty: the hospital has too few patients for a comparison")
    rare = rare_class(train.labels, num_classes) if rare is None else rare
    if not 0 <= rare < num_classes:
        raise AugmentError(f"rare class {rare} is not one of the {num_classes} classes")
    if not (train.labels == rare).any():
        raise AugmentError(f"the training patients hold no image of class {class_names[rare]}; nothing to oversample")
    extra = balancing_extra(train.labels, num_classes, rare) if extra is None else extra
    if extra < 1:
        raise AugmentError(f"nothing to add: class {class_names[rare]} is not rarer than the others (give --n)")
    for arm in arms:
        need = [rare] if arm == "synthetic" else list(range(num_classes)) if arm == ALL_CLASSES_ARM else []
        for c in need:
            have = synthetic.get(c, np.zeros((0,))).shape[0]
            want = extra
            if have < want:
                raise AugmentError(f"arm {arm} needs {want} synthetic images of class {class_names[c]}, have {have}: "
                                   f"draw {want - have} more (`medsynth node augment --class {class_names[c]}`) "
                                   "or add fewer (--n)")
    cfg = settings.classifier
    boot = _bootstrap_indices(test.patients, settings.bootstrap, settings.seed)

    def select(model: SmallCNN) -> float:
        return float(scores(predict_proba(model, val.images), val.labels, num_classes)["balanced_accuracy"])

    probas: dict[str, list[np.ndarray]] = {}
    base_full: dict[str, Any] = {}
    base: list[dict[str, Any]] = []
    results: list[ArmResult] = []
    for arm in arms:
        x, y = arm_training_set(arm, train, rare, extra, synthetic, settings.seed)
        augment = classic_augment(settings) if arm == "classic" else None
        proba = []  # one (N, C) per repeat
        for j in range(settings.repeats):
            model = train_classifier(x, y, num_classes, replace(cfg, seed=cfg.seed + 10 * j),
                                     desc=f"classifier {arm}" + (f" {j + 1}/{settings.repeats}" if settings.repeats > 1
                                                                 else ""), select=select, augment=augment)
            proba.append(predict_proba(model, test.images))
        probas[arm] = proba
        full = mean_scores(proba, test.labels, num_classes)
        resampled = [mean_scores([p[i] for p in proba], test.labels[i], num_classes) for i in boot]
        runs = tuple(float(scores(p, test.labels, num_classes)["sensitivity"][rare]) for p in proba)

        def est(key: str, c: int | None = None, *, full: dict[str, Any] = full,
                resampled: list[dict[str, Any]] = resampled) -> Estimate:
            pick = (lambda s: s[key]) if c is None else (lambda s: s[key][c])
            low, high = _interval([pick(s) for s in resampled])
            return Estimate(pick(full), low, high)

        delta_ba = delta_rare = None
        if arm == "real":
            base_full, base = full, resampled
        elif "real" in probas:
            diffs_ba = [s["balanced_accuracy"] - b["balanced_accuracy"] for s, b in zip(resampled, base, strict=True)]
            diffs_rare = [s["sensitivity"][rare] - b["sensitivity"][rare] for s, b in zip(resampled, base, strict=True)]
            delta_ba = Estimate(full["balanced_accuracy"] - base_full["balanced_accuracy"], *_interval(diffs_ba))
            delta_rare = Estimate(full["sensitivity"][rare] - base_full["sensitivity"][rare], *_interval(diffs_rare))
        results.append(ArmResult(
            arm=arm, train_images=int(y.size),
            train_counts=tuple(int(v) for v in np.bincount(y, minlength=num_classes)),
            balanced_accuracy=est("balanced_accuracy"), auc=est("auc"),
            sensitivity=tuple(est("sensitivity", c) for c in range(num_classes)),
            specificity=tuple(est("specificity", c) for c in range(num_classes)),
            delta_balanced_accuracy=delta_ba, delta_rare_sensitivity=delta_rare, rare_sensitivity_runs=runs))
    return Comparison(class_names=tuple(class_names), rare=rare, extra=extra,
                      train_counts=tuple(int(v) for v in np.bincount(train.labels, minlength=num_classes)),
                      val_images=val.size, test_images=test.size, test_patients=int(np.unique(test.patients).size),
                      settings=settings, arms=tuple(results))
