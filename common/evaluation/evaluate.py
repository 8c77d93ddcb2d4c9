"""``medsynth evaluate``: how good are a checkpoint's synthetic images, and do they copy anyone?

Steps (each reported as it runs):
1. load and verify the checkpoint, rebuild its generator (``common.checkpoint_model``);
2. load the reference (MedMNIST ``.npz`` or prepared cache) at the generator's image side;
3. the domain feature extractor for that reference: cached, else trained with a fixed seed
   (``common.evaluation.features``); its weights' SHA-256 is part of the result;
4. sample N synthetic images, class-conditionally, with the real training split's class balance
   (or uniform), latents from a fixed seed;
5. domain FD and KID, precision/recall and density/coverage in the extractor's feature space
   against the real training split (``common.evaluation.metrics``);
6. TSTR and TRTR (``common.evaluation.tstr``); TRTR depends only on the reference and is cached next to
   the extractor;
7. memorization in pixel space against the training and held-out splits, and (unless
   ``aggregate_only``) a picture of the closest pairs.

A pair model (``model.pairs``) is evaluated by :func:`evaluate_pair_model` against a pair cache:
the segmentation U-Nets in place of TSTR, then steps 3, 5 and 7 on the image channel of its pairs
(masks enter neither FD nor memorization).

``aggregate_only`` is for a hospital evaluating on its own data: only aggregate numbers are
written or printed, no picture holding a real image. Nothing is sent anywhere in any mode.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from common.atomic import write_bytes_atomic, write_json_atomic
from common.checkpoint_model import load_generator
from common.config import CANDIDATES, LATENT_SCALE, ModelConfig
from common.dataset import DatasetError, load_cache
from common.errors import UserError
from common.evaluation.features import FeatureExtractor, default_cache_dir, load_or_train_extractor
from common.evaluation.metrics import Memorization, frechet_distance, kernel_distance, memorization, precision_recall
from common.evaluation.reference import ReferenceData, load_reference, rows_in_test_split
from common.evaluation.segmentation import PAIRS_MULTIPLE, Pairs, evaluate_pairs
from common.evaluation.tstr import TSTR_CONFIG, ClassifierScore, balanced_labels, train_and_score
from common.export import Provenance
from common.report.plots import image_table

FD_KIND = ("domain FD/KID: features of a small CNN trained (fixed seed) on the reference's own training split; "
           "not Inception FID, not comparable with published FIDs")
EVALUATION_DIR = "evaluation"
# TSTR trains on this many times the real training images (drawn from the model): measured on a
# PneumoniaMNIST ε = 10 checkpoint, 1× gave TSTR AUC 0.827 and 4.25× 0.849 (same model, same judge).
TSTR_MULTIPLE = 5
FIDELITY_MAX = 5000  # real (and as many synthetic) images in FD/KID/precision-recall
REAL_VS_SYNTHETIC = "real_vs_synthetic.png"
# Below this many real test images an AUC or accuracy moves by several points between splits and
# seeds (the standard error of an AUC on 40 images of two classes is ≈ 0.07): said beside the table.
SMALL_TEST_SET = 200
SWAPPED_AUC = 0.4  # an AUC this far below chance is a ranking turned round, not a weak model


class EvaluationError(UserError, ValueError):
    """The evaluation was asked for something it cannot do; the message says what to change."""


class PairCacheRequired(EvaluationError):
    """A pair model (``model.pairs``) was given a cache of images without masks (prepared without ``--pairs``)."""


class ImageSource(Protocol):
    """What the evaluation needs from a generator (``LoadedGenerator`` is one)."""

    @property
    def cfg(self) -> ModelConfig: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...
    @property
    def provenance(self) -> Provenance: ...
    def sample(self, labels: np.ndarray, *, seed: int, latent_scale: float = ...,
               candidates: int = ..., say: Callable[[str], None] | None = ...) -> np.ndarray: ...
    def candidates_drawn(self, candidates: int) -> int: ...


@dataclass(frozen=True)
class EvaluateOptions:
    """What ``medsynth evaluate`` can be told; ``out`` defaults to ``<run folder>/evaluation``."""

    checkpoint: Path
    reference: Path
    out: Path | None = None
    held_out: Path | None = None
    n_synthetic: int | None = None  # None: TSTR_MULTIPLE × the real training images, PAIRS_MULTIPLE × pairs (≤ max)
    max_synthetic: int = 20000
    class_balance: Literal["real", "uniform"] = "real"
    seed: int = 0
    latent_scale: float = LATENT_SCALE  # sampling spread of the latents (common.models)
    candidates: int = CANDIDATES  # draws per image kept, by D's class head (common.models.draw_images)
    aggregate_only: bool = False
    memorization_ratio: float = 0.5
    cache_dir: Path | None = None
    unet_epochs: int = 20  # pair models: epochs of each U-Net (augmented: docs/segmentation.md, 20 as the benchmark)

    def __post_init__(self) -> None:
        if self.n_synthetic is not None and self.n_synthetic < 10:
            raise EvaluationError("--n must be at least 10 synthetic images")
        if self.class_balance not in ("real", "uniform"):
            raise EvaluationError(f"class balance must be 'real' or 'uniform', got {self.class_balance!r}")
        if not 0 < self.latent_scale <= 1:
            raise EvaluationError(f"--latent-scale must be in (0, 1], got {self.latent_scale}")
        if self.candidates < 1:
            raise EvaluationError(f"--candidates must be at least 1, got {self.candidates}")


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint file or folder belongs to (``RUN/checkpoints/round-NNNN…``)."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def output_dir(opts: EvaluateOptions) -> Path:
    return opts.out if opts.out is not None else run_folder(opts.checkpoint) / EVALUATION_DIR


def tstr_score(images: np.ndarray, labels: np.ndarray, reference: ReferenceData, *,
               desc: str = "TSTR classifier") -> ClassifierScore:
    """Train the judge on (images, labels), score it on the reference's real test split; the epoch
    is picked on the held-out split (MedMNIST's val) when there is one."""
    held = reference.held_out
    return train_and_score(images, labels, reference.test.images, reference.test.labels,
                           len(reference.class_names), TSTR_CONFIG, desc=desc,
                           validation=None if held is None else (held.images, held.labels))


def trtr_score(reference: ReferenceData, cache_dir: Path | None) -> ClassifierScore:
    """TRTR: :func:`tstr_score` of the real training split; cached (it never depends on the model)."""
    spec = json.dumps({"ref": reference.sha256, "size": reference.image_size, "cfg": asdict(TSTR_CONFIG),
                       "selected_on_held_out": reference.held_out is not None}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:32]
    path = (cache_dir or default_cache_dir()) / "trtr" / f"{key}.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        return ClassifierScore(float(raw["accuracy"]), float(raw["auc"]))
    score = tstr_score(reference.train.images, reference.train.labels, reference, desc="TRTR classifier")
    write_json_atomic(path, {"accuracy": score.accuracy, "auc": score.auc})
    return score


def closest_pairs_png(mem: Memorization, fake: np.ndarray, reference: ReferenceData, n: int = 8) -> bytes:
    """Rows of [synthetic | nearest training | nearest held-out] for the n most train-near samples."""
    assert reference.held_out is not None
    u8 = [np.clip((x[:, 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
          for x in (fake, reference.train.images, reference.held_out.images)]
    rows, captions = [], []
    for i in mem.closest(min(n, fake.shape[0])):
        rows.append([u8[0][i], u8[1][mem.i_train[i]], u8[2][mem.i_held[i]]])
        captions.append(f"d_train {mem.d_train[i]:.2f}  d_held {mem.d_held[i]:.2f}")
    return image_table(rows, columns=["synthetic", "nearest train", "nearest held-out"], captions=captions)


def real_vs_synthetic_png(fake: np.ndarray, fake_labels: np.ndarray, reference: ReferenceData,
                          class_names: tuple[str, ...], n: int = 6) -> bytes:
    """One row per class: ``n`` real training images of the class, then ``n`` synthetic ones."""
    def u8(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.clip((x[0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)  # (S, S)
        return out

    rows, captions = [], []
    for k, name in enumerate(class_names):
        real = reference.train.images[reference.train.labels == k][:n]
        synth = fake[fake_labels == k][:n]
        if real.shape[0] < n or synth.shape[0] < n:
            continue
        rows.append([u8(x) for x in real] + [u8(x) for x in synth])
        captions.append(name)
    columns = ["real"] + [""] * (n - 1) + ["synthetic"] + [""] * (n - 1)
    return image_table(rows, columns=columns, captions=captions)


def domain_extractor(reference: ReferenceData, opts: EvaluateOptions, say: Callable[[str], None]) -> FeatureExtractor:
    """The domain feature extractor of ``reference`` (cached, else trained with its fixed seed), reported."""
    extractor = load_or_train_extractor(reference, cache_dir=opts.cache_dir)
    say(f"feature extractor {'trained and cached' if extractor.trained_now else 'from cache'}: {extractor.path} "
        f"(sha256 {extractor.sha256[:12]}…)")
    if len(reference.class_names) == 1:
        say("note: the reference has one class, so the extractor had no label to learn from: its features are "
            "those of a seeded CNN taught nothing about the images (one fixed ruler, a coarse one)")
    return extractor


def memorization_check(fake: np.ndarray, reference: ReferenceData, opts: EvaluateOptions, out: Path,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """Memorization of synthetic images (N, 1, S, S) in pixel space against the reference's training and
    held-out images (``common.evaluation.metrics.memorization``), and, unless ``aggregate_only``, the
    picture of the closest pairs in ``out``. Skipped (``None`` rates) without held-out images.
    """
    result: dict[str, Any] = {"memorization_rate": None, "nearer_train_share": None,
                              "memorization_ratio": opts.memorization_ratio}
    if reference.held_out is None:
        say("memorization: skipped, no held-out real images (pass --held-out with a prepared folder)")
        return result
    mem = memorization(fake, reference.train.images, reference.held_out.images, ratio=opts.memorization_ratio)
    result.update(memorization_rate=mem.rate, nearer_train_share=mem.nearer_share)
    say(f"memorization: {mem.rate:.2%} of synthetic images are < {opts.memorization_ratio:g}× as far from "
        f"a training image as from any held-out one ({mem.nearer_share:.2%} simply nearer)")
    if not opts.aggregate_only:
        write_bytes_atomic(out / "closest_pairs.png", closest_pairs_png(mem, fake, reference))
    return result


def _fidelity(extractor: FeatureExtractor, fake: np.ndarray, real: np.ndarray, seed: int) -> dict[str, float]:
    f_fake, f_real = extractor(fake), extractor(real)
    kid, kid_std = kernel_distance(f_real, f_fake, seed=seed)
    fid = precision_recall(f_real, f_fake)
    return {"fd": frechet_distance(f_real, f_fake), "kid": kid, "kid_std": kid_std, "precision": fid.precision,
            "recall": fid.recall, "density": fid.density, "coverage": fid.coverage}


def evaluate(
    opts: EvaluateOptions, say: Callable[[str], None] = print, *, generator: ImageSource | None = None
) -> dict[str, Any]:
    """Run the whole evaluation; writes ``evaluation.json`` (and the picture) and returns the result.

    ``generator`` replaces the checkpoint's generator (tests: a generator that copies training
    images, or one that draws noise); by default it is loaded from ``opts.checkpoint``.
    """
    t0 = time.monotonic()
    loaded = generator is None
    if generator is None:
        generator = load_generator(opts.checkpoint)
    if generator.cfg.pairs:
        return evaluate_pair_model(opts, generator, say)
    reference = load_reference(opts.reference, generator.cfg.image_size, held_out=opts.held_out, seed=opts.seed)
    if loaded and generator.class_names != reference.class_names:  # names unknown to the checkpoint: take the data's
        generator = load_generator(opts.checkpoint, class_names=reference.class_names)
    if len(generator.class_names) != len(reference.class_names) and generator.cfg.conditional:
        raise EvaluationError(f"the model has classes {list(generator.class_names)}, the reference "
                              f"{list(reference.class_names)}: evaluate against data with the same classes")
    if generator.class_names != reference.class_names:
        say(f"note: the model's classes {list(generator.class_names)} are matched by index with the "
            f"reference's {list(reference.class_names)}")
    out = output_dir(opts)
    say(f"model {generator.provenance.checkpoint} (round {generator.provenance.round}, sha256 "
        f"{generator.provenance.model_sha256[:12]}…); reference {reference.name}: {len(reference.train)} train / "
        f"{len(reference.test)} test / {len(reference.held_out) if reference.held_out else 0} held-out images")
    extractor = domain_extractor(reference, opts, say)
    n = opts.n_synthetic or min(TSTR_MULTIPLE * len(reference.train), opts.max_synthetic)
    num_classes = len(reference.class_names)
    shares = reference.class_shares() if opts.class_balance == "real" else np.full(num_classes, 1.0 / num_classes)
    labels = balanced_labels(n, shares, seed=opts.seed)
    fake = generator.sample(labels, seed=opts.seed, latent_scale=opts.latent_scale, candidates=opts.candidates)
    real_cap = reference.train.images[:FIDELITY_MAX]
    fidelity_fake = fake[: real_cap.shape[0]]  # FD/KID/PRDC: as many synthetic as real images
    result: dict[str, Any] = {"fd_kind": FD_KIND, "n_synthetic": n, "n_test": len(reference.test),
                              "class_balance": opts.class_balance, "latent_scale": opts.latent_scale,
                              "candidates": generator.candidates_drawn(opts.candidates),
                              **_fidelity(extractor, fidelity_fake, real_cap, opts.seed)}
    say(f"domain FD {result['fd']:.3f}, KID {result['kid']:.4f}, precision {result['precision']:.3f}, "
        f"recall {result['recall']:.3f}")
    if generator.cfg.conditional:
        tstr = tstr_score(fake, labels, reference)
    else:
        tstr = ClassifierScore(float("nan"), float("nan"))
        say("the generator is not class-conditional: no TSTR")
    trtr = trtr_score(reference, opts.cache_dir)
    result.update(tstr_auc=tstr.auc, tstr_acc=tstr.accuracy, trtr_auc=trtr.auc, trtr_acc=trtr.accuracy)
    say(f"TSTR AUC {tstr.auc:.3f} ACC {tstr.accuracy:.3f}; TRTR AUC {trtr.auc:.3f} ACC {trtr.accuracy:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    if not opts.aggregate_only and generator.cfg.conditional:  # real images beside synthetic: never at a hospital
        write_bytes_atomic(out / REAL_VS_SYNTHETIC, real_vs_synthetic_png(fake, labels, reference,
                                                                          reference.class_names))
    result.update(memorization_check(fidelity_fake, reference, opts, out, say))
    result.update(
        reference=reference.name, reference_sha256=reference.sha256, extractor_sha256=extractor.sha256,
        model_sha256=generator.provenance.model_sha256, checkpoint=generator.provenance.checkpoint,
        round=generator.provenance.round, seed=opts.seed, aggregate_only=opts.aggregate_only,
        seconds=round(time.monotonic() - t0, 1),
    )
    write_json_atomic(out / "evaluation.json", result)
    say(f"evaluation written to {out / 'evaluation.json'}")
    return result


def evaluate_pair_model(opts: EvaluateOptions, generator: ImageSource, say: Callable[[str], None]) -> dict[str, Any]:
    """The evaluation of a pair model (``model.pairs``): the segmentation numbers of
    ``common.evaluation.segmentation`` (a U-Net trained on synthetic pairs and one trained on the
    reference's real training pairs, both tested on its real test pairs, and the agreement of synthetic
    masks with their images), then the image checks of :func:`evaluate` on the image channel.

    The reference is a prepared pair cache (``node prepare --pairs``), split by patient as the
    image evaluation splits a cache (``TEST_SHARE`` of the patients for the test, the same rows).
    Domain FD, KID, precision/recall and density/coverage compare the synthetic *images* (channel 0)
    with the real training images in the same extractor space as an image model's; memorization
    measures the synthetic images' pixel distances to the real training and ``--held-out`` images
    (:func:`memorization_check`, with its picture only outside ``aggregate_only``). Masks enter
    neither: they are judged by the U-Nets, and a held-out pair cache contributes its images only.
    """
    t0 = time.monotonic()
    try:
        ds = load_cache(opts.reference)
    except DatasetError as exc:
        raise EvaluationError(f"a pair model is evaluated against a prepared pair cache: {exc}") from exc
    if not ds.pairs:
        raise PairCacheRequired(f"{opts.reference} holds images without masks (prepared without --pairs) but the "
                                "model is a pair model (model.pairs): prepare the images with their masks, "
                                f"`medsynth node prepare --pairs --data DATA --out {opts.reference}`, and evaluate "
                                "again")
    if ds.image_size != generator.cfg.image_size or ds.num_patients < 2:
        raise EvaluationError(f"{opts.reference} must be a pair cache of {generator.cfg.image_size}×"
                              f"{generator.cfg.image_size} images and ≥ 2 patients; it holds {ds.num_patients} "
                              f"patient(s) and images of side {ds.image_size}")
    is_test = rows_in_test_split(ds, opts.seed)
    real_train, real_test = Pairs.of_channels(ds.images[~is_test]), Pairs.of_channels(ds.images[is_test])
    reference = load_reference(opts.reference, generator.cfg.image_size, held_out=opts.held_out, seed=opts.seed)
    n = opts.n_synthetic or min(PAIRS_MULTIPLE * len(real_train.images), opts.max_synthetic)
    epochs = opts.unet_epochs
    num_classes = len(generator.class_names)
    labels = balanced_labels(n, np.full(num_classes, 1.0 / num_classes), seed=opts.seed)
    synthetic = Pairs.of_channels(generator.sample(labels, seed=opts.seed, latent_scale=opts.latent_scale,
                                                   candidates=opts.candidates, say=say))
    say(f"pair model {generator.provenance.checkpoint}: U-Nets on {n} synthetic and {len(real_train.images)} real "
        f"training pairs, tested on {len(real_test.images)} real pairs ({epochs} epochs each)")
    scores = evaluate_pairs(synthetic, real_train, real_test, seed=opts.seed, epochs=epochs)
    extractor = domain_extractor(reference, opts, say)
    real_cap = reference.train.images[:FIDELITY_MAX]
    fidelity_fake = synthetic.images[: real_cap.shape[0]]  # (M, 1, S, S): the images of the pairs, no mask
    result: dict[str, Any] = {
        "kind": "segmentation", **scores.to_json(), "candidates": generator.candidates_drawn(opts.candidates),
        "fd_kind": FD_KIND + "; images only, masks not included",
        **_fidelity(extractor, fidelity_fake, real_cap, opts.seed),
    }
    out = output_dir(opts)
    out.mkdir(parents=True, exist_ok=True)
    result.update(memorization_check(fidelity_fake, reference, opts, out, say))
    result.update(
        reference=reference.name, reference_sha256=reference.sha256, extractor_sha256=extractor.sha256,
        model_sha256=generator.provenance.model_sha256, checkpoint=generator.provenance.checkpoint,
        round=generator.provenance.round, seed=opts.seed, latent_scale=opts.latent_scale,
        aggregate_only=opts.aggregate_only, seconds=round(time.monotonic() - t0, 1),
    )
    say(format_segmentation(result))
    write_json_atomic(out / "evaluation.json", result)
    say(f"evaluation written to {out / 'evaluation.json'}")
    return result


def format_segmentation(ev: dict[str, Any]) -> str:
    """The table of a pair model's evaluation: the U-Nets' Dice and IoU, then the image checks (absent
    from an evaluation written before they were part of it)."""
    lines = [
        f"  U-Net trained on synthetic pairs, tested on real:  Dice {ev['dice_synthetic']:.3f}  IoU "
        f"{ev['iou_synthetic']:.3f}" + (
            f"  (real images smoothed, σ {ev['smoothing_sigma']:g} px; as they are: Dice "
            f"{ev['dice_synthetic_unsmoothed']:.3f})" if "smoothing_sigma" in ev else ""),
        f"  U-Net trained on real pairs, tested on real:       Dice {ev['dice_real']:.3f}  IoU {ev['iou_real']:.3f}",
        f"  ratio synthetic / real Dice {ev['ratio']:.3f}    agreement (real U-Net on synthetic images vs their "
        f"masks) Dice {ev['agreement_dice']:.3f}",
    ]
    if "fd" in ev:
        lines.append(f"  images only: domain FD {_number(ev, 'fd')}    KID {_number(ev, 'kid')} ± "
                     f"{_number(ev, 'kid_std', 2)}    precision {_number(ev, 'precision', 3)}    recall "
                     f"{_number(ev, 'recall', 3)}    ({FD_KIND})")
    if "memorization_rate" in ev:
        lines.append(f"  memorization rate {_number(ev, 'memorization_rate', 3)}    nearer to train than held-out "
                     f"{_number(ev, 'nearer_train_share', 3)}")
    return "\n".join(lines)


def _number(ev: dict[str, Any], key: str, digits: int = 4) -> str:
    """One number of an evaluation for a table: ``–`` when absent or not finite (memorization without held-out)."""
    v = ev.get(key)
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:#.{digits}g}"  # 0.900, not 0.9


def format_evaluation(ev: dict[str, Any]) -> str:
    """The table a user reads at the end of ``medsynth evaluate``."""
    def f(key: str, digits: int = 4) -> str:
        return _number(ev, key, digits)

    if ev.get("kind") == "segmentation":
        return format_segmentation(ev)
    return "\n".join([
        *reading_notes(ev),
        f"  domain FD  {f('fd')}    KID {f('kid')} ± {f('kid_std', 2)}    ({FD_KIND})",
        f"  precision  {f('precision', 3)}    recall {f('recall', 3)}    density {f('density', 3)}    "
        f"coverage {f('coverage', 3)}",
        f"  TSTR       AUC {f('tstr_auc', 3)}  ACC {f('tstr_acc', 3)}    (trained on synthetic, tested on real)",
        f"  TRTR       AUC {f('trtr_auc', 3)}  ACC {f('trtr_acc', 3)}    (same classifier trained on real)",
        f"  memorization rate {f('memorization_rate', 3)}    nearer to train than held-out "
        f"{f('nearer_train_share', 3)}",
    ])


def reading_notes(ev: dict[str, Any]) -> list[str]:
    """How to read the table: a warning when the real test split is small, and what an AUC well
    below 0.5 means (the judge ranks the classes the wrong way round)."""
    notes = []
    n_test = ev.get("n_test")
    if isinstance(n_test, int) and n_test < SMALL_TEST_SET:
        notes.append(f"  note: only {n_test} real test images: AUC and accuracy move by several points between "
                     f"splits and seeds at this size (≥ {SMALL_TEST_SET} for figures to compare); read them as a "
                     "check that the pipeline runs, not as a measurement")
    low = [k for k in ("tstr_auc", "trtr_auc") if isinstance(v := ev.get(k), float) and v < SWAPPED_AUC]
    if low:
        notes.append(f"  note: {' and '.join(k.split('_')[0].upper() for k in low)} AUC well below 0.5: the "
                     "classifier ranks the two classes the wrong way round, i.e. the classes are swapped (the "
                     "model draws class 0 where the real images are class 1): check that data.class-names has "
                     "the same order at the server and every hospital; on a tiny test split it can also be chance")
    return notes
