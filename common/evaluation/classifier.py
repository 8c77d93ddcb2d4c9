"""A small CNN classifier, trained deterministically: the domain feature extractor and the TSTR judge.

Two parts of the evaluation need a classifier of real-looking images:

* the **feature extractor** behind the Fréchet distance and KID (``common.evaluation.features``): Inception
  weights cannot be downloaded here, so the features come from a classifier trained on the
  reference data set's own training split (a "domain FD", not comparable with Inception FIDs);
* **TSTR / TRTR** (``common.evaluation.tstr``): the same architecture trained on synthetic or on real images
  and tested on real ones (Esteban, Hyland, Rätsch, "Real-valued (medical) time series
  generation with recurrent conditional GANs", 2017).

Training is seeded end to end (initialisation, shuffling, augmentation) with private
``torch.Generator`` objects, so two calls with the same data and config give the same weights
on the same machine and thread count; nothing global is reseeded.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class ClassifierConfig:
    """Width of the first conv block (doubled twice), epochs, batch, Adam learning rate, seed.

    ``shift`` is the largest random translation in pixels used as augmentation (0: none): it
    makes the classifier judge content rather than exact pixel positions. ``check_every``: with a
    ``select`` score, the model is scored every that many steps (0: at each epoch's end only) and
    the best-scoring point is kept, so the training length is picked on the validation split
    whatever the training set's size.
    """

    width: int = 32
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    shift: int = 2
    seed: int = 0
    check_every: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("classifier width, epochs and batch_size must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.shift < 0 or self.check_every < 0:
            raise ValueError("classifier lr must be > 0, weight_decay, shift and check_every >= 0")


class SmallCNN(nn.Module):
    """(B, 1, S, S) in [-1, 1] → logits (B, C); ``features`` gives the (B, 4·width) embedding.

    Three conv blocks (conv 3×3, BatchNorm, ReLU, 2×2 max-pool), then global average pooling:
    the pooled vector is the feature used for FD/KID/precision/recall.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        chans = (1, width, 2 * width, 4 * width)
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(chans):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(4 * width, num_classes)
        self.num_classes = num_classes
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x).mean(dim=(2, 3))  # (B, 4·width)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))  # (B, C)
        return out


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-replicate padding)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, 1, S+2m, S+2m)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig, *, desc: str = "classifier",
    select: Callable[[SmallCNN], float] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> SmallCNN:
    """Train a :class:`SmallCNN` on float32 images (N, 1, S, S) in [-1, 1] and int labels (N,).

    ``select`` scores the model (in eval mode) after every epoch and every ``cfg.check_every``
    steps, e.g. its AUC on a validation split; the best-scoring point is returned (early stopping).
    Without it, the last. ``augment`` transforms every training batch (B, 1, S, S) after the shift,
    drawing from the seeded augmentation generator (e.g. ``common.evaluation.augment.classic_augment``).
    Returns the model in eval mode. Deterministic for a given (data, cfg) on one machine.
    """
    if images.ndim != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images (N, 1, S, S) and labels (N,), got {images.shape} and {labels.shape}")
    if images.shape[0] == 0:
        raise ValueError("cannot train a classifier on zero images")
    init = torch.Generator().manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
    with torch.random.fork_rng(devices=[]):  # init draws from the global RNG: fork it, do not disturb it
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=init)))
        model = SmallCNN(num_classes, cfg.width)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    n = x_all.shape[0]
    batches = (n + cfg.batch_size - 1) // cfg.batch_size
    best: tuple[float, dict[str, torch.Tensor]] | None = None

    def check() -> None:
        nonlocal best
        if select is None:
            return
        model.eval()
        score = select(model)
        model.train()
        if best is None or score > best[0]:
            best = (score, copy.deepcopy(model.state_dict()))

    step = 0
    with tqdm(total=cfg.epochs * batches, desc=desc, unit="batch", leave=False) as bar:
        for _ in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=order_gen)
            for b in range(batches):
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                if idx.numel() < 2:  # BatchNorm needs two rows; a lone trailing row is skipped
                    continue
                x = _random_shift(x_all[idx], cfg.shift, aug_gen)
                if augment is not None:
                    x = augment(x, aug_gen)
                loss = F.cross_entropy(model(x), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                step += 1
                if cfg.check_every and step % cfg.check_every == 0 and b < batches - 1:
                    check()
            check()  # at each epoch's end
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model: SmallCNN, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, C) float64 of images (N, 1, S, S), model in eval mode."""
    model.eval()
    out = [
        torch.softmax(model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))), dim=1)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).double().numpy() if out else np.zeros((0, model.num_classes))


@torch.no_grad()
def embed(model: SmallCNN, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Penultimate features (N, D) float64 of images (N, 1, S, S), model in eval mode."""
    model.eval()
    out = [
        model.features(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).double().numpy() if out else np.zeros((0, model.feature_dim))
