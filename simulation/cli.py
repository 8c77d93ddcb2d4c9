"""Research commands of ``medsynth``: simulated federations, and judging and exporting a model.

    medsynth simulate [options]                  N virtual hospitals on this machine (default demo)
    medsynth simulate --write-sites DIR [data options]
                                                 only their DICOM folders, one per hospital, to rehearse
                                                 a deployment (simulation/rehearsal.py)
    medsynth evaluate --checkpoint RUN --reference REAL
                                                 quality, usefulness and memorization of the images
    medsynth sample --checkpoint RUN --n N --out DIR
                                                 synthetic images (png, npz, dicom) with provenance
    medsynth audit [options]                     empirical privacy audit of simulated trainings
                                                 (simulation/audit/), writes OUT/audit.json

Registered by ``medsynth.cli`` (the hospital's and the server's commands live in ``client/cli.py``
and ``server/cli.py``). torch and the evaluation code are imported by the command that runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.atomic import write_json_atomic
from common.cli_help import CANDIDATES_HELP, DefaultsOnceHelpFormatter, says_its_default
from common.config import CANDIDATES, LATENT_SCALE, parse_class_names
from common.export import FORMATS, SIDECAR, ExportError, export_images
from simulation.run_options import AUTO_C, AUTO_COMPLETE_UP_TO, secagg_degree_option

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parsers(sub: SubParsers) -> None:
    """Add ``simulate``, ``evaluate``, ``sample`` and ``audit`` to the ``medsynth`` parser."""
    _simulate_parser(sub)
    _evaluate_parsers(sub)
    _audit_parser(sub)


class _AppDefaultsHelpFormatter(DefaultsOnceHelpFormatter):
    """Shows a run option's default (``None``: the app's, from ``[tool.flwr.app.config]``) as that value, once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        from simulation.run_options import RUN_OPTIONS  # read only when help is printed

        text = action.help or ""
        if action.default is None and action.dest in RUN_OPTIONS and not says_its_default(text):
            from common.config import app_defaults

            key = RUN_OPTIONS[action.dest]
            return f"{text} (default: {app_defaults()[key]}, the app's {key})"
        return super()._get_help_string(action)


def _simulate_parser(sub: SubParsers) -> None:
    p = sub.add_parser(
        "simulate",
        help="run N virtual hospitals through Flower's Simulation Engine",
        description=(
            "Train a DP-GAN across N virtual hospitals on this machine (or on a running Ray cluster: --ray-address). "
            "Each hospital's data is "
            "written as DICOM and prepared like a real node's; the run uses its own Flower "
            "SuperLink (own FLWR_HOME and port) and stops it afterwards. Results: OUT/summary.json, "
            "OUT/samples/*.png, OUT/checkpoints/, and each hospital's privacy ledger. "
            "With --write-sites DIR nothing is trained: each hospital's DICOM folder is written to "
            "DIR/site-N/<class>/ for a rehearsal of a real deployment (deploy/README.md), the same data and "
            "split a simulation with these options trains on."
        ),
        formatter_class=_AppDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("medsynth-output/simulation"), help="results folder")
    p.add_argument("--sites", type=int, default=3, help="number of virtual hospitals")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--epsilon", type=float, default=None,
                   help="per-hospital privacy budget ε (patient level); no hospital ever exceeds it")
    p.add_argument("--delta", type=float, default=None, help="δ of the (ε, δ) guarantee")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="fix σ instead of calibrating it; hospitals then stop when the budget is reached "
                        "(default: the app's dp.calibrate, true: σ calibrated so the planned rounds end at, "
                        "never above, the budget)")
    p.add_argument("--seed", type=int, default=None, help="seed for data generation, partitioning and model init")
    p.add_argument("--dataset", type=Path, default=None,
                   help="a MedMNIST v2 .npz (e.g. pneumoniamnist.npz); default: built-in DICOM phantoms")
    p.add_argument("--max-images", type=int, default=None,
                   help="use a random subset of this many training images of --dataset")
    p.add_argument("--partition", default="iid",
                   help="'iid' or 'dirichlet:ALPHA' (label skew; smaller ALPHA = more skew); never splits a patient")
    p.add_argument("--patients-per-site", type=int, default=200, help="phantoms: patients per hospital")
    p.add_argument("--images-per-patient", type=int, default=2, help="phantoms: images per patient")
    p.add_argument("--image-size", type=int, default=None, choices=(32, 64), help="model image side")
    p.add_argument("--local-steps", type=int, default=None, help="private D steps per hospital per round")
    p.add_argument("--batch-size", type=int, default=None,
                   help="generated images per D and G step (and the public divisor of D's noisy gradient)")
    p.add_argument("--sample-rate", type=float, default=None,
                   help="Poisson rate q: each patient's chance to be in a D step, the same at every hospital "
                        "(public, so the ε a hospital reports does not reveal its patient count)")
    p.add_argument("--d-steps-per-g", type=int, default=None,
                   help="private D steps per G step (under DP noise D must keep up with G)")
    p.add_argument("--warm-start-share", type=float, default=None,
                   help="share of each hospital's ε for round 0's release of its class means, which starts "
                        "and anchors the generator (docs/privacy.md); 0: no warm start")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="steps the server pre-trains the generator on round 0's summed release (post-processing, "
                        "no privacy cost; fewer: a quicker, rougher start)")
    p.add_argument("--pairs", action="store_true",
                   help="train a generator of image–mask pairs (run key model.pairs; docs/segmentation.md): "
                        "phantoms carry their lesion masks, each hospital's masks/ folder is paired with its images")
    p.add_argument("--no-dp", action="store_true",
                   help="train WITHOUT differential privacy (no clipping, no noise, nothing charged): a non-private "
                        "reference for benchmarks only; a deployed hospital refuses such a run")
    p.add_argument("--cpus-per-site", type=int, default=1, help="whole CPUs reserved per virtual hospital")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the virtual hospitals on this running Ray cluster (the GCS address `ray start --head` "
                        "prints, port 6379 by default) instead of a private Ray on this machine; every node needs "
                        "the same medsynth checkout and environment, and OUT at the same path (docs/simulation.md)")
    p.add_argument("--device", default=None,
                   help="auto (CUDA when a GPU is visible to the virtual hospitals, else CPU), cpu, cuda")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    p.add_argument("--plain-aggregation", action="store_true",
                   help="turn secure aggregation OFF: the server then sees every hospital's update "
                        "(default: secure aggregation, the server learns only the sum)")
    p.add_argument("--secagg-degree", default=None, metavar="K|auto",
                   help="secure aggregation on a sparse SecAgg+ graph: each hospital masks with K others (0: all "
                        f"of them); auto: 0 up to {AUTO_COMPLETE_UP_TO} hospitals, else ceil({AUTO_C:g}·log2 n)")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT's checkpoints and ledgers and continue from the last good round")
    p.add_argument("--write-sites", type=Path, default=None, metavar="DIR",
                   help="write each hospital's DICOM folder (DIR/site-N/<class>/*.dcm, the layout `medsynth node "
                        "prepare` reads) and stop, for a rehearsal; only --sites, --dataset, --max-images, --pairs, "
                        "--partition, --patients-per-site, --images-per-patient and --seed apply")
    p.add_argument("--reference", type=Path, default=None,
                   help="real images (MedMNIST .npz or prepared cache) to evaluate the final model against; "
                        "results go to summary.json under 'evaluation' and to report.html")
    p.add_argument("--eval-images", type=int, default=None, metavar="N",
                   help="synthetic images drawn for the final evaluation's TSTR classifier (default: 5 × the "
                        "reference's training images, at most 20000; fewer is faster, and its AUC noisier)")
    p.add_argument("--no-evaluation", action="store_true",
                   help="skip the final evaluation (phantoms are otherwise evaluated against a population no "
                        "hospital holds): for sizing a schedule, where only times and ε matter")
    p.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                   help="start G and D from this round-NNNN.safetensors of a public pre-training run (same model "
                        "settings) instead of the seeded random initialisation; its sha256 goes into every "
                        "checkpoint and export (docs/configuration.md, 'Starting from a public model')")
    p.set_defaults(func=cmd_simulate)


def _evaluate_parsers(sub: SubParsers) -> None:
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
            "sent anywhere in any mode. A pair model (model.pairs) is judged against a prepared pair cache "
            "(node prepare --pairs): Dice and IoU of a U-Net trained on synthetic pairs next to one trained on "
            "real pairs, the agreement of synthetic masks with their images, and the FD, KID and memorization "
            "checks above on its images (masks enter neither; docs/segmentation.md)."
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
                   help="synthetic images to draw for TSTR (default: 5 × the real training images, at most 20000; "
                        "a pair model's U-Net: 3 × the real training pairs; FD, KID, precision/recall and "
                        "memorization use as many as there are real ones, ≤ 5000)")
    e.add_argument("--class-balance", choices=("real", "uniform"), default="real",
                   help="class mix of the synthetic set: that of the real training split (default), or uniform")
    e.add_argument("--seed", type=int, default=0, help="seed of the latent vectors and subsampling")
    e.add_argument("--latent-scale", type=float, default=LATENT_SCALE,
                   help="spread of the latents, z ~ N(0, scale² I); 1 draws as in training; conditional models "
                        "only: an unconditional (pair) model's images do not depend on it (docs/evaluation.md)")
    e.add_argument("--candidates", type=int, default=CANDIDATES,
                   help=CANDIDATES_HELP)
    e.add_argument("--memorization-ratio", type=float, default=0.5,
                   help="a synthetic image counts as memorized when d(nearest train) < RATIO × d(nearest held-out)")
    e.add_argument("--aggregate-only", action="store_true",
                   help="hospital mode: write and print only aggregate numbers, no picture of real images")
    e.add_argument("--cache-dir", type=Path, default=None,
                   help="where feature extractors are cached (default: $MEDSYNTH_CACHE or ~/.cache/medsynth)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "sample",
        help="export synthetic images (png, npz or dicom) with a provenance sidecar",
        description=(
            "Draw N images from a checkpoint's generator and write them to OUT as PNG files or DICOM files (one "
            "sub-folder per class) or as one synthetic.npz. DICOM files are Secondary Capture, marked synthetic "
            "(Conversion Type SYN, Image Type DERIVED\\SECONDARY\\SYNTHETIC, a series description saying so), "
            "with fresh UIDs and no patient data. A pair model (model.pairs) also writes each mask: as a PNG under "
            "masks/, as a DICOM SEG beside each DICOM image (marked synthetic alike), or in the npz. Every export "
            "carries " + SIDECAR + ": the model hash, the run, "
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
    s.add_argument("--latent-scale", type=float, default=LATENT_SCALE,
                   help="spread of the latents, z ~ N(0, scale² I); 1 draws as in training; conditional models "
                        "only: an unconditional (pair) model's images do not depend on it (docs/evaluation.md)")
    s.add_argument("--candidates", type=int, default=CANDIDATES,
                   help=CANDIDATES_HELP)
    s.add_argument("--classes", default=None,
                   help="comma-separated class names in class-index order, for a checkpoint whose run did not "
                        "record them (default: the run's names, else class0, class1, ...)")
    s.set_defaults(func=cmd_sample)


def _audit_parser(sub: SubParsers) -> None:
    a = sub.add_parser(
        "audit",
        help="empirical privacy audit: an ε lower bound from canaries in simulated DP training",
        description=(
            "Measure the privacy of the DP training instead of only computing it (simulation only). "
            "Trains the federation in one process (the hospitals' local round, noise calibration and FedAvg; "
            "no Flower, no secure aggregation) with gradient canaries: m coordinates of the discriminator, "
            "each an extra patient of one hospital, included with probability 1/2 and then Poisson-sampled "
            "at the run's rate q and added, with norm C, to the clipped gradient sum before the noise. From "
            "the global model after each round (what the server sees), against a shadow run with no canary in, it "
            "guesses which canaries were in and "
            "turns the correct guesses into a LOWER BOUND on ε at the stated confidence (Steinke, Nasr, "
            "Jagielski, 'Privacy auditing with one (1) training run', NeurIPS 2023). The ledgers' ε is an "
            "upper bound; a correct implementation keeps every lower bound at or below it. A lower bound "
            "under the claim is evidence, not a proof: an attack that found little says nothing of a better "
            "one. Runs: every --epsilons budget, a non-private control (--no-control skips it) and a broken "
            "control (the same training at --broken ε with σ multiplied by 1e-3 while the claim stays: its "
            "bound must exceed the claim, or the audit could not fail), each once per --seeds seed. Writes "
            "OUT/audit.json and each run's folder OUT/<run>/ (checkpoints, report.html with an 'Empirical "
            "privacy' section); prints a table. Exit 0 when done (the verdict is in the table), 2 for a "
            "setting to fix. The bound cannot exceed about 5.8 with 2000 canaries (every guess right), so only "
            "claims below that can be contradicted (docs/privacy.md, 'Empirical audit'). Then, unless "
            "--no-membership, membership inference on what is released: per seed, one federation per "
            "--epsilons budget and a non-private control, trained on 4 × 128 member patients for 24 rounds "
            "(long enough that the non-private run memorizes), attacked through the discriminator's "
            "logit, GAN-Leaks (Chen et al., CCS 2020) and DOMIAS (van Breugel et al., AISTATS 2023) with "
            "held-out non-members and a member-vs-member control: AUC, TPR at 1 % and 0.1 % FPR and the "
            "ε lower bound they imply, in OUT/membership/<run>/."
        ),
        formatter_class=DefaultsOnceHelpFormatter,
    )
    a.add_argument("--out", type=Path, default=Path("medsynth-output/audit"), help="results folder")
    a.add_argument("--dataset", type=Path, default=None,
                   help="a MedMNIST v2 .npz (e.g. pneumoniamnist.npz); default: built-in phantoms")
    a.add_argument("--preset", default=None,
                   help="run settings presets/NAME.toml on top of the app defaults (default: none, the app's)")
    a.add_argument("--sites", type=int, default=4, help="virtual hospitals")
    a.add_argument("--partition", default="dirichlet:0.5", help="'iid' or 'dirichlet:ALPHA'")
    a.add_argument("--max-images", type=int, default=None, help="use a random subset of this many images")
    a.add_argument("--patients-per-site", type=int, default=200, help="phantoms: patients per hospital")
    a.add_argument("--epsilons", default="10,1", help="the DP runs' budgets, comma-separated")
    a.add_argument("--broken", type=float, default=1.0,
                   help="claimed ε of the broken control (noise off, claim kept); 0 skips it")
    a.add_argument("--no-control", action="store_true", help="skip the non-private control")
    a.add_argument("--seeds", default="0", help="comma-separated seeds; every run once per seed")
    a.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the preset's or app's)")
    a.add_argument("--local-steps", type=int, default=None, help="D steps per hospital per round (default: the "
                   "preset's or app's)")
    a.add_argument("--canaries", type=int, default=None,
                   help="m, the number of gradient canaries (default: 2000, at most D's parameter count)")
    a.add_argument("--confidence", type=float, default=0.95, help="confidence 1 − β of every lower bound")
    a.add_argument("--warm-start", action="store_true",
                   help="keep the warm-start release (default: off, the whole budget goes to the audited "
                        "DP-SGD steps)")
    a.add_argument("--no-membership", action="store_true",
                   help="skip the membership-inference part (its own federations on 4 × 128 member patients, "
                        "about 2 min each on one core)")
    a.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    """``medsynth audit``: the audit runs (``simulation.audit.run``), ``audit.json`` and a table."""
    from simulation.audit.run import AuditOptions, audit, format_findings

    opts = AuditOptions.from_args(args)
    report = audit(opts)
    print(format_findings(report.findings))
    print(f"audit: {opts.out / 'audit.json'}")
    return 0


#: ``simulate`` options that concern training: refused with ``--write-sites``, which trains nothing.
TRAINING_ONLY = ("rounds", "epsilon", "delta", "noise_multiplier", "image_size", "local_steps", "batch_size",
                 "sample_rate", "d_steps_per_g", "warm_start_share", "pretrain_steps", "device", "resume",
                 "plain_aggregation", "secagg_degree", "reference", "no_dp", "init_from", "eval_images",
                 "no_evaluation", "ray_address")


def cmd_simulate(args: argparse.Namespace) -> int:
    """``medsynth simulate``: a whole federation on this machine (``simulation.runner``), or with
    ``--write-sites`` only its hospitals' data (``simulation.rehearsal``)."""
    from simulation.runner import SimulateOptions, simulate

    if args.write_sites is not None:
        from common.config import ConfigError
        from simulation.rehearsal import write_sites

        given = [f"--{name.replace('_', '-')}" for name in TRAINING_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise ConfigError(f"--write-sites trains nothing: {', '.join(given)} would have no effect; leave "
                              f"{'it' if len(given) == 1 else 'them'} out")
        write_sites(SimulateOptions(out=args.out, sites=args.sites, seed=args.seed, dataset=args.dataset,
                                    pairs=True if args.pairs else None, partition=args.partition,
                                    patients_per_site=args.patients_per_site,
                                    images_per_patient=args.images_per_patient, max_images=args.max_images),
                    args.write_sites)
        return 0
    simulate(
        SimulateOptions(
            out=args.out,
            sites=args.sites,
            rounds=args.rounds,
            epsilon=args.epsilon,
            delta=args.delta,
            noise_multiplier=args.noise_multiplier,
            seed=args.seed,
            dataset=args.dataset,
            partition=args.partition,
            patients_per_site=args.patients_per_site,
            images_per_patient=args.images_per_patient,
            max_images=args.max_images,
            image_size=args.image_size,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            sample_rate=args.sample_rate,
            d_steps_per_g=args.d_steps_per_g,
            cpus_per_site=args.cpus_per_site,
            device=args.device,
            timeout_s=args.timeout,
            resume=args.resume,
            secure_aggregation=False if args.plain_aggregation else None,
            secagg_degree=secagg_degree_option(args.secagg_degree, args.sites),
            warm_start_share=args.warm_start_share,
            pretrain_steps=args.pretrain_steps,
            dp=False if args.no_dp else None,
            pairs=True if args.pairs else None,
            reference=args.reference,
            evaluation=not args.no_evaluation,
            eval_images=args.eval_images,
            init_from=args.init_from,
            ray_address=args.ray_address,
        )
    )
    return 0


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
    """``medsynth evaluate``: the metrics, and the run's report rewritten with them."""
    from common.evaluation.evaluate import (
        EvaluateOptions,
        EvaluationError,
        evaluate,
        format_evaluation,
        output_dir,
        run_folder,
    )
    from common.report.html import write_report

    opts = EvaluateOptions(
        checkpoint=args.checkpoint, reference=args.reference, out=args.out, held_out=args.held_out,
        n_synthetic=args.n_synthetic, class_balance=args.class_balance, seed=args.seed, latent_scale=args.latent_scale,
        candidates=args.candidates, aggregate_only=args.aggregate_only, memorization_ratio=args.memorization_ratio,
        cache_dir=args.cache_dir,
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
    """``medsynth sample``: N images of a checkpoint's generator, exported with their provenance."""
    from common.checkpoint_model import load_generator

    if args.n < 1:
        raise ExportError("--n must be at least 1")
    if not 0 < args.latent_scale <= 1:
        raise ExportError(f"--latent-scale must be in (0, 1], got {args.latent_scale}")
    if args.candidates < 1:
        raise ExportError(f"--candidates must be at least 1, got {args.candidates}")
    override = parse_class_names(args.classes) if args.classes else None
    generator = load_generator(args.checkpoint, override_names=override)
    names = generator.class_names
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if args.seed is None else args.seed
    if args.label is not None:
        labels = np.full(args.n, _class_index(args.label, names), dtype=np.int64)
    else:
        labels = np.arange(args.n, dtype=np.int64) % len(names)
    images = generator.sample(labels, seed=seed, latent_scale=args.latent_scale, candidates=args.candidates, say=print)
    files = export_images(images, labels, args.out, args.format, generator.provenance,
                          sampling={"seed": seed, "class": args.label, "n": args.n, "latent_scale": args.latent_scale,
                                    "candidates": generator.candidates_drawn(args.candidates)})
    eps = {s: round(p.epsilon, 4) for s, p in generator.provenance.sites.items()}
    pairs = (" (image–mask pairs: masks in masks/, as DICOM SEG <name>.seg.dcm beside DICOM images, or the npz's "
             "'masks')" if generator.cfg.pairs else "")
    print(f"wrote {len(files)} file(s) ({args.format}{pairs}) to {args.out}; sidecar {args.out / SIDECAR}")
    print(f"model {generator.provenance.model_sha256[:12]}… round {generator.provenance.round}; ε per hospital {eps}")
    return 0
