"""``medsynth evaluate`` and ``medsynth sample``: judge a checkpoint's images, and export them.

Registered by ``simulation.cli`` with :func:`add_parsers`; :func:`run` executes either command.
User errors raise the typed exceptions listed in ``USER_ERRORS`` (printed as one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_json_atomic
from common.checkpoint_model import CheckpointUnusable, load_generator
from common.config import parse_class_names
from common.evaluation.evaluate import (
    EvaluateOptions,
    EvaluationError,
    evaluate,
    format_evaluation,
    output_dir,
    run_folder,
)
from common.evaluation.features import ExtractorCacheCorrupt
from common.evaluation.reference import ReferenceDataError
from common.export import FORMATS, SIDECAR, ExportError, export_images
from common.report.html import write_report

USER_ERRORS = (CheckpointUnusable, EvaluationError, ExportError, ExtractorCacheCorrupt, ReferenceDataError)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``evaluate`` and ``sample`` sub-commands to the ``medsynth`` parser."""
    e = sub.add_parser(
        "evaluate",
        help="quality, usefulness and memorization of a checkpoint's images against real ones",
        description=(
            "Compare a generator with real images. Reports a domain Fréchet distance and KID (features of a "
            "small CNN trained with a fixed seed on the reference's own training split, cached and hashed; "
            "NOT Inception FID), precision/recall and density/coverage, TSTR (a classifier trained on "
            "synthetic images, tested on the real test split) next to TRTR (the same classifier trained on real "
            "images), and memorization (the share of synthetic images much nearer to a training image than to "
            "any held-out one; the closest pairs are saved as a picture). Writes OUT/evaluation.json; when the "
            "checkpoint belongs to a run folder, that run's report.html is rewritten with the evaluation. "
            "At a hospital, use --aggregate-only: nothing but aggregate numbers is written, and nothing is "
            "sent anywhere in any mode."
        ),
    )
    e.add_argument("--checkpoint", type=Path, required=True,
                   help="a round-NNNN.safetensors file, or a run folder (its newest valid checkpoint is used)")
    e.add_argument("--reference", type=Path, required=True,
                   help="real images: a MedMNIST .npz (train/val/test splits) or a prepared cache folder "
                        "(`medsynth node prepare`; split 80/20 by patient into train/test)")
    e.add_argument("--held-out", type=Path, default=None,
                   help="prepared cache of real images the model never trained on (memorization yardstick for a "
                        "cache reference; a .npz uses its val split)")
    e.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/evaluation)")
    e.add_argument("--n", type=int, default=None, dest="n_synthetic",
                   help="synthetic images to draw (default: as many as real training images, at most 5000)")
    e.add_argument("--class-balance", choices=("real", "uniform"), default="real",
                   help="class mix of the synthetic set: that of the real training split (default), or uniform")
    e.add_argument("--seed", type=int, default=0, help="seed of the latent vectors and subsampling (default: 0)")
    e.add_argument("--memorization-ratio", type=float, default=0.5,
                   help="a synthetic image counts as memorized when d(nearest train) < RATIO × d(nearest held-out) "
                        "(default: 0.5)")
    e.add_argument("--aggregate-only", action="store_true",
                   help="hospital mode: write and print only aggregate numbers, no picture of real images")
    e.add_argument("--cache-dir", type=Path, default=None,
                   help="where feature extractors are cached (default: $MEDSYNTH_CACHE or ~/.cache/medsynth)")

    s = sub.add_parser(
        "sample",
        help="export synthetic images (png, npz or dicom) with a provenance sidecar",
        description=(
            "Draw N images from a checkpoint's generator and write them to OUT as PNG files or DICOM files (one "
            "sub-folder per class) or as one synthetic.npz. DICOM files are Secondary Capture, marked synthetic "
            "(Conversion Type SYN, Image Type DERIVED\\SECONDARY\\SYNTHETIC, a series description saying so), "
            "with fresh UIDs and no patient data. Every export carries " + SIDECAR + ": the model hash, the run, "
            "and the epsilon and delta of every hospital that trained the model."
        ),
    )
    s.add_argument("--checkpoint", type=Path, required=True,
                   help="a round-NNNN.safetensors file, or a run folder (its newest valid checkpoint is used)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--class", dest="label", default=None,
                   help="class name or index to draw (default: classes in equal shares)")
    s.add_argument("--format", choices=FORMATS, default="png", help="output format (default: png)")
    s.add_argument("--out", type=Path, required=True, help="output folder (must not hold an earlier export)")
    s.add_argument("--seed", type=int, default=None, help="seed of the latent vectors (default: random)")
    s.add_argument("--classes", default=None,
                   help="comma-separated class names in class-index order, for a checkpoint whose run did not "
                        "record them (default: the run's names, else class0, class1, ...)")


def _class_index(label: str, names: tuple[str, ...]) -> int:
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise ExportError(f"unknown class {label!r}; this model's classes are {', '.join(names)} (or 0..{len(names) - 1})")


def attach_to_summary(path: Path, result: dict[str, Any]) -> None:
    """Put the evaluation into an existing ``summary.json`` under ``evaluation``."""
    if path.is_file():
        summary = json.loads(path.read_text())
        summary["evaluation"] = result
        write_json_atomic(path, summary)


def cmd_evaluate(args: argparse.Namespace) -> int:
    opts = EvaluateOptions(
        checkpoint=args.checkpoint, reference=args.reference, out=args.out, held_out=args.held_out,
        n_synthetic=args.n_synthetic, class_balance=args.class_balance, seed=args.seed,
        aggregate_only=args.aggregate_only, memorization_ratio=args.memorization_ratio, cache_dir=args.cache_dir,
    )
    if not 0 < opts.memorization_ratio <= 1:
        raise EvaluationError("--memorization-ratio must be in (0, 1]")
    result = evaluate(opts)
    print(format_evaluation(result))
    run = run_folder(opts.checkpoint)
    if not opts.aggregate_only and (run / "server_state.json").is_file():
        attach_to_summary(run / "summary.json", result)
        pairs = output_dir(opts) / "closest_pairs.png"
        print(f"report: {write_report(run, evaluation=result, closest_pairs=pairs)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ExportError("--n must be at least 1")
    override = parse_class_names(args.classes) if args.classes else None
    generator = load_generator(args.checkpoint, override_names=override)
    names = generator.class_names
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if args.seed is None else args.seed
    if args.label is not None:
        labels = np.full(args.n, _class_index(args.label, names), dtype=np.int64)
    else:
        labels = np.arange(args.n, dtype=np.int64) % len(names)
    images = generator.sample(labels, seed=seed)
    files = export_images(images, labels, args.out, args.format, generator.provenance,
                          sampling={"seed": seed, "class": args.label, "n": args.n})
    eps = {s: round(p.epsilon, 4) for s, p in generator.provenance.sites.items()}
    print(f"wrote {len(files)} {args.format} file(s) to {args.out}; sidecar {args.out / SIDECAR}")
    print(f"model {generator.provenance.model_sha256[:12]}… round {generator.provenance.round}; ε per hospital {eps}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute ``evaluate`` or ``sample`` (``args.command``)."""
    return cmd_evaluate(args) if args.command == "evaluate" else cmd_sample(args)
