"""A hospital's rare class, augmented: synthetic images from the global model it holds, and the classifier test.

``medsynth node augment`` draws N images of one class from the newest global model the hospital
keeps (``STATE/global-model``, written by ``client.task.keep_global_model`` and
``client.final_model``), or from a checkpoint it names, and writes them as an export
(``common.export``: marked synthetic, with the ``medsynth_export.json`` sidecar: model hash, round,
each hospital's ε) under ``STATE/synthetic/``, beside the prepared cache and never inside it: the
cache stays the hospital's real images only, so training and ``node evaluate`` never see a
synthetic image as a patient. A pair model's (``model.pairs``) draws are image–mask pairs: the
export writes each mask with its image, under the same name (``common.export.export_images``:
``masks/<class>/<name>.png`` for PNG and DICOM, plus a DICOM SEG beside a DICOM image; ``masks`` in
the NPZ), with the same sidecar.

The model is the federation's DP output, which every hospital receives anyway; sampling it is
post-processing and costs no privacy. The final model the server sends after a run's last round
carries every hospital's newest privacy report (``client.final_model``): its sidecar lists them,
with this hospital's own ε from its ledger. A model kept during a run has no reports, so its
sidecar lists the own ε only and says so. A run folder's checkpoint (``--checkpoint``, e.g. a
simulation's ``OUT/checkpoints``) lists every hospital from its round history.

``medsynth node train-classifier`` (:func:`compare_at_site`) trains the hospital's classifier
four ways on its own patients (``common.evaluation.augment``) and prints and writes numbers only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.config import CANDIDATES, CLASSIFIER_REPEATS, GLOBAL_MODEL_DIR, LATENT_SCALE, site_paths
from common.errors import UserError
from common.export import SIDECAR, ExportError, ExportFormat, Provenance, SitePrivacy, export_images
from common.pairs import IMAGE_CHANNEL

SYNTHETIC_DIR = "synthetic"  # under a site's state folder, beside (never inside) the cache
COMPARISON_DIR = "augment"  # under a site's state folder: train-classifier's numbers
OWN_LEDGER_NOTE = ("this hospital's ε from its own ledger only: the global model kept during a run carries no "
                   "round history, so the other hospitals' ε are not known here (the final model brings them)")
RELAYED_NOTE = ("this hospital's ε from its own ledger; the other hospitals' ε as the server relayed their reports "
                "with the final model")


class AugmentUnavailable(UserError, ValueError):
    """No model to draw from, or a request that cannot be met (N, class, folder); the message says the fix."""


@dataclass(frozen=True)
class AugmentResult:
    """What ``node augment`` wrote: the export folder, its files, the class, the model and the privacy listed."""

    out: Path
    files: tuple[Path, ...]
    label: str
    provenance: Provenance
    own_ledger_only: bool
    pairs: bool = False  # a pair model's export: every image has its mask (common.export)


def class_index(label: str, names: Sequence[str]) -> int:
    """A class by name, else by index; unknown → :class:`AugmentUnavailable` naming the classes."""
    if label in names:
        return list(names).index(label)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise AugmentUnavailable(f"unknown class {label!r}; this model's classes are {', '.join(names)} "
                             f"(or 0..{len(names) - 1})")


def model_source(state_dir: Path, checkpoint: Path | None) -> Path:
    """The checkpoint to draw from: ``checkpoint``, else the newest kept global model."""
    if checkpoint is not None:
        if not checkpoint.exists():
            raise AugmentUnavailable(f"--checkpoint {checkpoint}: no such file or folder")
        return checkpoint
    models = state_dir / GLOBAL_MODEL_DIR
    if not any(models.glob("round-*.safetensors")):
        raise AugmentUnavailable(f"no global model at {models} yet: the node keeps the newest model the server sends "
                                 "with each training round (and the final one after the last); augment after this "
                                 "hospital has taken part in a run, or pass --checkpoint")
    return models


def _own_privacy(ledger_path: Path) -> dict[str, SitePrivacy]:
    """This hospital's cumulative (ε, δ) from its ledger, keyed by its site id; empty without a ledger."""
    from client.ledger import PrivacyLedger

    if not ledger_path.is_file():
        return {}
    ledger = PrivacyLedger.read(ledger_path)
    site = str(json.loads(ledger_path.read_text()).get("site") or "this-hospital")
    return {site: SitePrivacy(epsilon=ledger.epsilon(), delta=ledger.delta, epsilon_budget=ledger.epsilon_budget,
                              steps=ledger.total_steps)}


def augment_site(state_dir: Path, label: str, n: int, *, cache_dir: Path | None = None,
                 checkpoint: Path | None = None, out: Path | None = None, seed: int | None = None,
                 latent_scale: float = LATENT_SCALE, candidates: int = CANDIDATES,
                 fmt: ExportFormat = "npz", say: Callable[[str], None] | None = None) -> AugmentResult:
    """Draw ``n`` images of class ``label`` (image–mask pairs for a pair model) and export them beside
    the hospital's cache.

    ``out`` defaults to ``STATE/synthetic/<class>-<model hash>-seed<seed>``; a folder inside the
    cache, or one already holding an export, is refused. The model's class names must be the cache's.
    """
    from common.checkpoint_model import load_generator
    from common.dataset import CACHE_FILE

    if n < 1:
        raise AugmentUnavailable(f"--n must be at least 1, got {n}")
    if not 0 < latent_scale <= 1:
        raise AugmentUnavailable(f"--latent-scale must be in (0, 1], got {latent_scale}")
    if candidates < 1:
        raise AugmentUnavailable(f"--candidates must be at least 1, got {candidates}")
    paths = site_paths(state_dir)
    cache = (cache_dir or paths.cache_dir).resolve()
    generator = load_generator(model_source(state_dir, checkpoint))
    names = generator.class_names
    index = class_index(label, names)
    if (cache / CACHE_FILE).is_file():
        from common.dataset import load_cache

        cached = load_cache(cache).class_names
        if tuple(cached) != tuple(names):
            raise AugmentUnavailable(f"the model's classes {list(names)} are not the prepared cache's {list(cached)}; "
                                     "augment with the model of the run this cache trained")
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed
    provenance = generator.provenance
    own_only = not provenance.sites
    relayed = checkpoint is None and not own_only  # the final model's reports; this hospital trusts its ledger
    if own_only or relayed:
        provenance = replace(provenance, sites={**provenance.sites, **_own_privacy(paths.ledger_path)})
    target = out if out is not None else (
        state_dir / SYNTHETIC_DIR / f"{names[index]}-{provenance.model_sha256[:12]}-seed{seed}")
    resolved = target.resolve()
    if resolved == cache or cache in resolved.parents:
        raise AugmentUnavailable(f"--out {target} lies in the prepared cache {cache}: synthetic images are written "
                                 "beside the real ones, never among them; choose another folder")
    if (target / SIDECAR).exists():
        raise AugmentUnavailable(f"{target} already holds an export; give --out or another --seed")
    labels = np.full(n, index, dtype=np.int64)
    images = generator.sample(labels, seed=seed, latent_scale=latent_scale, candidates=candidates,
                              say=say)  # (n, C, S, S) in [-1, 1], C = 2: pairs
    sampling = {"seed": seed, "class": names[index], "n": n, "latent_scale": latent_scale,
                "candidates": generator.candidates_drawn(candidates),
                "purpose": "augment the hospital's training set; not patient data"}
    if own_only or relayed:
        sampling["privacy_note"] = OWN_LEDGER_NOTE if own_only else RELAYED_NOTE
    try:
        files = export_images(images, labels, target, fmt, provenance, sampling=sampling)
    except ExportError as exc:
        raise AugmentUnavailable(str(exc)) from exc
    return AugmentResult(target, tuple(files), names[index], provenance, own_only, pairs=generator.cfg.pairs)


@dataclass(frozen=True)
class SyntheticSet:
    """Synthetic images of one or more npz exports, by class, in [-1, 1] (M, 1, S, S)."""

    by_class: dict[int, np.ndarray]
    sources: tuple[Path, ...]


def read_synthetic(folders: Sequence[Path], class_names: Sequence[str], image_size: int) -> SyntheticSet:
    """The images of npz exports (``synthetic.npz`` + sidecar marked synthetic), checked against the cache's
    class names and image size."""
    by_class: dict[int, list[np.ndarray]] = {}
    for folder in folders:
        sidecar, data = folder / SIDECAR, folder / "synthetic.npz"
        if not sidecar.is_file() or not data.is_file():
            raise AugmentUnavailable(f"{folder} is not an npz export of `medsynth node augment` (needs {SIDECAR} and "
                                     "synthetic.npz; export with --format npz)")
        meta = json.loads(sidecar.read_text())
        if meta.get("synthetic") is not True:
            raise AugmentUnavailable(f"{sidecar} does not mark its images synthetic; refusing to mix them in")
        with np.load(data, allow_pickle=False) as npz:
            pixels, labels, names = npz["images"], npz["labels"], tuple(str(x) for x in npz["class_names"])
        if names != tuple(class_names):
            raise AugmentUnavailable(f"{folder}: classes {list(names)} are not the cache's {list(class_names)}")
        if pixels.shape[1:] != (image_size, image_size):
            raise AugmentUnavailable(f"{folder}: images are {pixels.shape[1]}×{pixels.shape[2]}, the cache's "
                                     f"{image_size}×{image_size}")
        images = (pixels.astype(np.float32) / 127.5 - 1.0)[:, None]  # (M, 1, S, S)
        for c in np.unique(labels):
            by_class.setdefault(int(c), []).append(images[labels == c])
    return SyntheticSet({c: np.concatenate(v) for c, v in by_class.items()}, tuple(folders))


def find_exports(state_dir: Path) -> list[Path]:
    """Every npz export under ``STATE/synthetic``, oldest name first."""
    root = state_dir / SYNTHETIC_DIR
    return sorted(p.parent for p in root.glob(f"*/{SIDECAR}") if (p.parent / "synthetic.npz").is_file())


def compare_at_site(state_dir: Path, *, cache_dir: Path | None = None, synthetic: Sequence[Path] = (),
                    label: str | None = None, extra: int | None = None, all_classes: bool = False,
                    seed: int = 0, bootstrap: int = 1000, epochs: int | None = None,
                    repeats: int = CLASSIFIER_REPEATS,
                    say: Callable[[str], None] = print) -> tuple[str, dict[str, object]]:
    """Train the hospital's classifier (a)–(d) on its own patients (60 % train, 20 % validation, 20 %
    test, by patient, seeded), return the table and the JSON written to ``STATE/augment/comparison.json``.

    Without ``synthetic`` folders every npz export under ``STATE/synthetic`` is used; arm (d) is
    left out, with a note, when there is none. The classifier reads images only: a pair cache's
    image channel, and an export's images (a pair export's masks are not read).
    """
    from common.atomic import write_json_atomic
    from common.dataset import load_cache
    from common.evaluation.augment import (
        ALL_CLASSES_ARM,
        ARMS,
        HOSPITAL_CLASSIFIER,
        AugmentSettings,
        Split,
        compare_arms,
        patient_split,
    )

    data = load_cache(cache_dir or site_paths(state_dir).cache_dir)
    folders = list(synthetic) or find_exports(state_dir)
    synth = read_synthetic(folders, data.class_names, data.image_size) if folders else SyntheticSet({}, ())
    images = data.images[:, IMAGE_CHANNEL : IMAGE_CHANNEL + 1]  # (N, 1, S, S): a pair cache's masks are no input
    whole = Split(images, data.labels, data.patients)
    train_idx, val_idx, test_idx = patient_split(data.labels, data.patients, (0.6, 0.2, 0.2), seed)
    train, val, test = whole.take(train_idx), whole.take(val_idx), whole.take(test_idx)
    rare = class_index(label, data.class_names) if label is not None else None
    arms: list[str] = list(ARMS) if synth.by_class else [a for a in ARMS if a != "synthetic"]
    if all_classes:
        arms.append(ALL_CLASSES_ARM)
    if not synth.by_class:
        say("no synthetic export found (run `medsynth node augment --format npz` first): arm (d) left out")
    if epochs is not None and epochs < 1:
        raise AugmentUnavailable(f"--epochs must be at least 1, got {epochs}")
    classifier = HOSPITAL_CLASSIFIER if epochs is None else replace(HOSPITAL_CLASSIFIER, epochs=epochs)
    settings = AugmentSettings(classifier=classifier, seed=seed, bootstrap=bootstrap, repeats=repeats)
    result = compare_arms(train, val, test, data.num_classes, data.class_names, synthetic=synth.by_class,
                          rare=rare, extra=extra, arms=arms, settings=settings)
    record: dict[str, object] = {**result.to_json(), "synthetic_exports": [str(p) for p in synth.sources],
                                 "split": "by patient, 60/20/20, stratified by majority label"}
    write_json_atomic(state_dir / COMPARISON_DIR / "comparison.json", record)
    return result.format(), record
