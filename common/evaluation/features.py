"""The domain feature extractor: a seeded classifier of the reference data, cached and hashed.

FD and KID need a fixed feature space. The usual one, Inception-v3 on ImageNet, cannot be
downloaded here and knows little about chest X-rays at 28 px; instead the features are the
penultimate layer of a :class:`common.evaluation.classifier.SmallCNN` trained, with a fixed seed, on the
reference data set's own training split. The resulting distance is a *domain* Fréchet
distance: comparable between runs that use the same extractor (same ``sha256``), never with
published Inception FIDs.

Cache: ``<cache>/extractors/<key>.safetensors`` where ``key`` hashes the reference file's
SHA-256, the image side, the class count, the classifier config and ``EXTRACTOR_VERSION``. The
file holds the weights (pickle-free safetensors) and, in its metadata, ``content_sha256`` over
every tensor's name, dtype, shape and bytes; it is checked on every load, and the evaluation
reports it, so two results with the same extractor hash were measured with the same ruler.
The cache folder is ``$MEDSYNTH_CACHE`` or ``~/.cache/medsynth`` unless the caller passes one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common.atomic import write_bytes_atomic
from common.checkpoint import content_hash
from common.errors import UserError
from common.evaluation.classifier import ClassifierConfig, SmallCNN, embed, train_classifier
from common.evaluation.reference import ReferenceData

EXTRACTOR_VERSION = 1
EXTRACTOR_CONFIG = ClassifierConfig(width=32, epochs=8, batch_size=128, lr=1e-3, shift=2, seed=20240601)


class ExtractorCacheCorrupt(UserError):
    """A cached extractor fails its hash check; it is never used."""


@dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """Embeds images (N, 1, S, S) in [-1, 1] into (N, D) float64 features."""

    model: SmallCNN
    sha256: str
    path: Path
    trained_now: bool

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return embed(self.model, images)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDSYNTH_CACHE", Path.home() / ".cache" / "medsynth"))


def extractor_key(reference: ReferenceData, cfg: ClassifierConfig) -> str:
    spec = {
        "version": EXTRACTOR_VERSION,
        "reference_sha256": reference.sha256,
        "image_size": reference.image_size,
        "num_classes": len(reference.class_names),
        "config": asdict(cfg),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _state_arrays(model: SmallCNN) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(path: Path, num_classes: int, cfg: ClassifierConfig) -> FeatureExtractor:
    blob = path.read_bytes()
    try:
        arrays = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError) as exc:
        raise ExtractorCacheCorrupt(f"cached extractor {path} is unreadable ({exc}); delete it to retrain") from exc
    digest = content_hash(arrays)
    if digest != meta.get("content_sha256"):
        raise ExtractorCacheCorrupt(f"cached extractor {path} fails its hash check; delete it to retrain")
    model = SmallCNN(num_classes, cfg.width)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    model.eval()
    return FeatureExtractor(model, digest, path, trained_now=False)


def load_or_train_extractor(
    reference: ReferenceData, *, cache_dir: Path | None = None, cfg: ClassifierConfig = EXTRACTOR_CONFIG
) -> FeatureExtractor:
    """The cached extractor for ``reference``; trains and caches it (seeded) the first time."""
    folder = (cache_dir or default_cache_dir()) / "extractors"
    path = folder / f"{extractor_key(reference, cfg)}.safetensors"
    num_classes = len(reference.class_names)
    if path.is_file():
        return _load(path, num_classes, cfg)
    model = train_classifier(reference.train.images, reference.train.labels, num_classes, cfg,
                             desc="feature extractor")
    arrays = _state_arrays(model)
    digest = content_hash(arrays)
    meta = {
        "content_sha256": digest,
        "reference_sha256": reference.sha256,
        "reference": reference.name,
        "config": json.dumps(asdict(cfg), sort_keys=True),
        "version": str(EXTRACTOR_VERSION),
    }
    write_bytes_atomic(path, st_save(arrays, metadata=meta))
    return FeatureExtractor(model, digest, path, trained_now=True)
