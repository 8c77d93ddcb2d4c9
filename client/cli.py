"""The hospital's commands: ``medsynth node …`` and the hospital's ``medsynth certs …``.

    medsynth node prepare --data DIR --out CACHE   DICOM folder → local training cache, with a report
    medsynth node privacy --ledger FILE            privacy spent per run and round, from the ledger
    medsynth node start --config node.toml         the hospital daemon (client/daemon.py)
    medsynth node status --config node.toml        running?, ε spent and left, caps, last round, logs
    medsynth node audit --config node.toml         every message that left the hospital
    medsynth node evaluate --config node.toml      the newest (after a run: the final) global model
                                                   against local images; --checkpoint PATH another one
    medsynth node augment --config node.toml --class LABEL --n N
                                                   N synthetic images of a class, beside the cache
    medsynth node train-classifier --config node.toml
                                                   the hospital's classifier: real, classic augmentation,
                                                   oversampling, + synthetic rare class (numbers only)
    medsynth certs node --site ID --out DIR        this hospital's auth and signing keys
    medsynth certs fingerprint FILE...             signing-key fingerprints to pin in node.toml

Registered by ``medsynth.cli``; it imports common/ and client/ only, so a hospital install
without server/ and simulation/ runs every command here. Heavy modules (torch, Opacus, pydicom)
are imported by the command that needs them, not to build the parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_help import CANDIDATES_HELP, DefaultsOnceHelpFormatter

_SIDECAR = "medsynth_export.json"  # common.export.SIDECAR, named here without importing numpy for --help
_LATENT_SCALE = 0.7  # common.config.LATENT_SCALE (checked equal by tests/test_augment.py)
_CANDIDATES = 3  # common.config.CANDIDATES (likewise)
_CLASSIFIER_REPEATS = 3  # common.config.CLASSIFIER_REPEATS (likewise)

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parsers(sub: SubParsers) -> None:
    """Add ``node`` and its sub-commands to the ``medsynth`` parser."""
    node = sub.add_parser("node", help="hospital-side commands", description="Hospital-side commands.")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = nsub.add_parser(
        "prepare",
        help="turn a DICOM folder into the local training cache",
        description=(
            "Read every DICOM file under DATA (labels = first-level sub-folder names, or a CSV, or a "
            "DICOM attribute), apply the "
            "modality LUT, VOI LUT/window and MONOCHROME1 inversion, resize, and write the cache "
            "to OUT. Patient IDs are kept only as salted hashes. Prints a report of kept and "
            "rejected files; the cache is rebuilt only when the folder changed."
        ),
        formatter_class=DefaultsOnceHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="folder of DICOM files, one sub-folder per label")
    p.add_argument("--out", type=Path, required=True, help="cache folder to write")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64), help="side of the cached images")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels in class order (default: sorted folder names, CSV labels "
                        "or attribute values)")
    p.add_argument("--labels-csv", type=Path, default=None,
                   help="labels from a CSV of 'path-or-SOPInstanceUID,label' rows (paths relative to DATA)")
    p.add_argument("--label-attribute", default=None, metavar="KEYWORD",
                   help="labels from this DICOM attribute, e.g. BodyPartExamined")
    p.add_argument("--modality", default=None,
                   help="keep only these Modality (0008,0060) values, comma-separated, e.g. CT,MR")
    p.add_argument("--body-part", default=None,
                   help="keep only these Body Part Examined (0018,0015) values, comma-separated, e.g. CHEST")
    p.add_argument("--salt-file", type=Path, default=None,
                   help="secret salt for patient hashes (created 0600 if missing; default OUT/../salt.bin)")
    p.add_argument("--denoise", default="none", choices=("none", "median3", "median5"),
                   help="optional denoising of every frame before resizing: a 3x3 or 5x5 median filter removes "
                        "salt-and-pepper (impulse) noise; recorded in the cache fingerprint, so changing it "
                        "rebuilds the cache (docs/augment.md)")
    p.add_argument("--pairs", action="store_true",
                   help="image–mask pairs for a run with model.pairs: pair each image with its mask "
                        "DATA/masks/<same path>.png or, without one, with the DICOM SEG files in DATA that reference "
                        "it (docs/segmentation.md); images without a usable mask are rejected by reason")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder did not change")
    p.add_argument("--list-rejected", type=Path, default=None, metavar="FILE",
                   help="write every rejected file with its reason, detail and fix to this CSV (names "
                        "files: keep it at the hospital; implies --force; outside DATA)")
    p.set_defaults(func=cmd_prepare)

    p = nsub.add_parser(
        "privacy",
        help="print the privacy ledger: ε spent, budget left, per run and round",
        description="Read a hospital's privacy ledger and recompute ε from its full history.",
    )
    p.add_argument("--ledger", type=Path, default=None, help="the hospital's ledger.json")
    p.add_argument("--config", type=Path, default=None,
                   help="node.toml instead of --ledger (deployed node); also checks the ledger against its audit log")
    p.add_argument("--audit-log", type=Path, default=None,
                   help="with --ledger: the hospital's audit.jsonl, to check the ledger was not deleted or rolled back")
    p.set_defaults(func=cmd_privacy)

    p = nsub.add_parser("start", help="run this hospital's node daemon",
                        description="Check node.toml, keys and the server's certificate, prepare the local "
                                    "dataset, then run flower-supernode (outbound TLS only) until stopped.")
    p.add_argument("--config", type=Path, required=True, help="node.toml (see deploy/node.example.toml)")
    p.set_defaults(func=cmd_start)

    p = nsub.add_parser("status", help="this hospital's node: running?, budget spent and left, caps, last round, logs",
                        description="Read this hospital's own files (node.toml, ledger, audit log, daemon.json) and "
                                    "say whether the node daemon runs, how much of the budget is spent and left, "
                                    "what one run may do, the last round, and where the logs are. Exit status 2 "
                                    "when the ledger cannot be trusted (deleted or rolled back).")
    p.add_argument("--config", type=Path, required=True, help="node.toml")
    p.set_defaults(func=cmd_status)

    p = nsub.add_parser("audit", help="print the audit log: every message that left this hospital",
                        description="Print every message this hospital sent, from its audit log.")
    p.add_argument("--config", type=Path, default=None, help="node.toml (the log is STATE/audit.jsonl)")
    p.add_argument("--log", type=Path, default=None, help="an audit.jsonl file instead of --config")
    p.set_defaults(func=cmd_audit)

    p = nsub.add_parser(
        "evaluate", help="judge the newest global model against this hospital's own images (aggregates only)",
        description="Run `medsynth evaluate` at the hospital: the newest global model the server sent (kept in "
                    "STATE/global-model; after a run, the final model the server sends after its last round), "
                    "or the checkpoint --checkpoint names, "
                    "against the prepared local images (STATE/cache, split 80/20 by patient). "
                    "Only aggregate numbers are printed and written (STATE/evaluation/evaluation.json); no picture "
                    "of a real image is made and nothing is sent. The local test patients were also training "
                    "patients of the federation; for memorization, and for a TSTR free of that overlap, give "
                    "--held-out: a prepared folder of patients that never took part. A pair model (model.pairs) "
                    "is judged against the cache's image–mask pairs (prepared with --pairs; a cache without masks "
                    "is refused): Dice and IoU of a U-Net trained on synthetic pairs and of one trained on the "
                    "local pairs, the agreement of synthetic masks with their images, and FD and memorization of "
                    "the images (docs/segmentation.md).")
    p.add_argument("--config", type=Path, required=True, help="node.toml")
    p.add_argument("--held-out", type=Path, default=None,
                   help="prepared cache (`medsynth node prepare`) of patients the federation never saw")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent vectors and the split")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint file (round-NNNN.safetensors) or folder to judge instead of the newest "
                        "global model")
    p.set_defaults(func=cmd_evaluate)

    p = nsub.add_parser(
        "augment", help="draw N synthetic images of one class from the global model, beside the prepared cache",
        description="Draw N images of class LABEL (image–mask pairs from a pair model, each mask under its "
                    "image's name in masks/) from the newest global model this hospital holds "
                    "(STATE/global-model) or from --checkpoint, and write them to STATE/synthetic/<class>-<model>-"
                    "seed<seed>/ (or --out), beside the prepared cache and never inside it: the cache keeps only "
                    "real images. The export is marked synthetic and carries " + _SIDECAR + " (model hash, round, "
                    "the epsilon and delta of every hospital the model lists; a kept global model lists only this "
                    "hospital's, from its ledger). Sampling the federation's DP model costs no privacy. "
                    "`medsynth node train-classifier` then measures whether the images help this hospital's "
                    "classifier. Give --config (a deployed node) or --site-dir (a simulation's OUT/sites/site-N).",
        formatter_class=DefaultsOnceHelpFormatter)
    _site_options(p)
    p.add_argument("--class", dest="label", required=True, help="class name or index to draw, e.g. the rare finding")
    p.add_argument("--n", type=int, required=True, help="number of images (at least 1)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint file or run folder instead of the kept global model (a run folder's "
                        "checkpoint lists every hospital's epsilon)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default STATE/synthetic/...)")
    p.add_argument("--format", choices=("npz", "png", "dicom"), default="npz",
                   help="npz is what train-classifier reads; png/dicom for viewing (one sub-folder per class)")
    p.add_argument("--seed", type=int, default=None, help="seed of the latent vectors (default: random)")
    p.add_argument("--latent-scale", type=float, default=_LATENT_SCALE,
                   help="spread of the latents, z ~ N(0, scale^2 I), in (0, 1]; conditional models only: an "
                        "unconditional (pair) model's images do not depend on it (docs/evaluation.md)")
    p.add_argument("--candidates", type=int, default=_CANDIDATES,
                   help=CANDIDATES_HELP)
    p.set_defaults(func=cmd_augment)

    p = nsub.add_parser(
        "train-classifier",
        help="does the synthetic rare class help this hospital's classifier? (a)-(d) on its own patients",
        description="Train this hospital's classifier (the project's seeded small CNN) four ways on its own "
                    "prepared images: (a) real only, (b) real + classic augmentation (flips, rotations up to 10 "
                    "degrees, brightness and contrast jitter), (c) real + the rare class oversampled, (d) real + "
                    "synthetic images of the rare class (the npz exports of `medsynth node augment` under "
                    "STATE/synthetic, or --synthetic). (c) and (d) add the same number of images. Patients are "
                    "split 60/20/20 into training, validation (picks each classifier's step) and test, seeded, "
                    "the same for every arm. Prints balanced accuracy, AUC, per-class sensitivity and "
                    "specificity with 95%% bootstrap intervals over test patients; writes only these numbers to "
                    "STATE/augment/comparison.json. Nothing leaves the hospital.",
        formatter_class=DefaultsOnceHelpFormatter)
    _site_options(p)
    p.add_argument("--synthetic", type=Path, action="append", default=None, metavar="DIR",
                   help="an npz export to use for (d) (repeatable; default: every export under STATE/synthetic)")
    p.add_argument("--class", dest="label", default=None,
                   help="the rare class (default: the class with the fewest training images)")
    p.add_argument("--n", dest="extra", type=int, default=None,
                   help="rare-class images (c) and (d) add (default: as many as level it with the largest class)")
    p.add_argument("--all-classes", action="store_true",
                   help="also (e): as many synthetic images of every class as (d) adds of the rare class")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split, the oversampling and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test patients")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every arm's classifier (default: the hospital classifier's 20)")
    p.add_argument("--repeats", type=int, default=_CLASSIFIER_REPEATS,
                   help="classifiers trained per arm, each with its own seed; every score is their mean (one small "
                        "classifier's own randomness moves a rare class's sensitivity by 10-20 points)")
    p.set_defaults(func=cmd_train_classifier)


def _site_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="node.toml of a deployed node")
    where.add_argument("--site-dir", type=Path,
                       help="a site's state folder instead, e.g. a simulation's OUT/sites/site-0 (cache/, "
                            "global-model/, ledger.json)")


def _site_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The state folder and the cache of ``--config`` or ``--site-dir``."""
    if args.config is not None:
        from client.node_config import NodeDeployConfig

        cfg = NodeDeployConfig.load(args.config)
        return cfg.state_dir, cfg.cache_dir
    from common.config import site_paths

    if not args.site_dir.is_dir():
        from common.errors import MissingFile

        raise MissingFile(f"--site-dir {args.site_dir}: no such folder")
    return args.site_dir, site_paths(args.site_dir).cache_dir


def add_certs_commands(csub: SubParsers) -> None:
    """Add the hospital's ``certs`` sub-commands (``node``, ``fingerprint``)."""
    p = csub.add_parser("node", help="a hospital's SuperNode auth key pair and secure-aggregation signing key",
                        description="Run at the hospital. Send <site>.auth.pub and <site>.secagg.json to the "
                                    "consortium operator; the .key files never leave this machine.")
    p.add_argument("--site", required=True, help="the hospital's site id, e.g. site-0")
    p.add_argument("--out", type=Path, required=True, help="folder for the four files")
    p.set_defaults(func=cmd_certs_node)
    p = csub.add_parser("fingerprint", help="signing-key fingerprints to pin in node.toml [consortium.members]",
                        description="Print the SHA-256 fingerprint of each hospital's secure-aggregation "
                                    "signing key, as node.toml lines. Read them to each other out of band "
                                    "(phone, signed letter) before pinning them: the roster alone comes "
                                    "from the operator.")
    p.add_argument("entries", type=Path, nargs="+", help="<site>.secagg.json files or a roster.json")
    p.set_defaults(func=cmd_certs_fingerprint)


# ---------------------------------------------------------------------------------- node
def cmd_prepare(args: argparse.Namespace) -> int:
    """``medsynth node prepare``: DICOM folder → training cache, and the report."""
    from client.prepare.pipeline import load_or_create_salt, prepare_site
    from common.config import parse_class_names

    salt_file = args.salt_file or args.out.parent / "salt.bin"
    report = prepare_site(
        args.data,
        args.out,
        image_size=args.image_size,
        salt=load_or_create_salt(salt_file),
        class_names=parse_class_names(args.classes) if args.classes else None,
        force=args.force,
        progress=True,
        labels_csv=args.labels_csv,
        label_attribute=args.label_attribute,
        modalities=(args.modality or "").split(","),
        body_parts=(args.body_part or "").split(","),
        rejected_list=args.list_rejected,
        denoise=args.denoise,
        pairs=args.pairs,
    )
    print(report.format())
    print(f"cache: {args.out}  (report: {args.out / 'prepare_report.json'})")
    if args.list_rejected is not None:
        print(f"rejected files: {args.list_rejected}")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    """``medsynth node privacy``: the ledger's ε per run and round, recomputed from its history."""
    from collections import defaultdict

    from client.ledger import PrivacyLedger
    from common.config import ConfigError
    from common.dp.accounting import epsilon_of

    if args.ledger is None and args.config is None:
        raise ConfigError("give --ledger ledger.json or --config node.toml")
    audit_log: Path | None = args.audit_log
    if args.ledger is None:
        from client.node_config import NodeDeployConfig

        node = NodeDeployConfig.load(args.config)
        args.ledger, audit_log = node.ledger_path, audit_log or node.audit_path
    ledger = PrivacyLedger.read(args.ledger, audit_path=audit_log)  # a rolled-back ledger is refused, not shown
    print(f"ledger {args.ledger}  accountant {ledger.accountant}  δ = {ledger.delta:g}")
    if audit_log is not None:
        numbered = (f"sequence {ledger.sequence}" if ledger.sequence
                    else "no sequence yet: written before rollback protection, numbered at its next round")
        print(f"audit log {audit_log} agrees: not deleted, not rolled back ({numbered})")
    by_run: dict[int, list[str]] = defaultdict(list)
    history = []
    for entry in ledger.entries:
        history.append(entry.charge)
        eps = epsilon_of(history, ledger.delta, ledger.accountant)
        by_run[entry.run].append(
            f"    round {entry.round:>3}: {entry.steps} steps, σ = {entry.noise_multiplier:.4f}, "
            f"q = {entry.sample_rate:.4f} → cumulative ε = {eps:.4f}"
        )
    for run, lines in by_run.items():
        print(f"  run {run}:")
        print("\n".join(lines))
    spent = ledger.epsilon()
    print(f"ε spent {spent:.4f} of budget {ledger.epsilon_budget:g}; left {max(ledger.epsilon_budget - spent, 0):.4f}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """``medsynth node start``: the hospital daemon, until stopped."""
    from client.daemon import start_node
    from client.node_config import NodeDeployConfig

    start_node(NodeDeployConfig.load(args.config), say=lambda line: print(line, flush=True))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``medsynth node status``: see :func:`client.status.node_status`."""
    from client.node_config import NodeDeployConfig
    from client.status import node_status

    text, code = node_status(NodeDeployConfig.load(args.config))
    print(text)
    return code


def cmd_audit(args: argparse.Namespace) -> int:
    """``medsynth node audit``: every message that left the hospital."""
    from client.audit import format_entries, read_records
    from client.node_config import NodeDeployConfig
    from common.config import ConfigError

    if args.log is None and args.config is None:
        raise ConfigError("give --config node.toml or --log audit.jsonl")
    path = args.log if args.log is not None else NodeDeployConfig.load(args.config).audit_path
    print(format_entries(read_records(path)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medsynth node evaluate``: see :func:`evaluate_at_node`."""
    from client.node_config import NodeDeployConfig

    cfg = NodeDeployConfig.load(args.config)
    return evaluate_at_node(cfg.state_dir, cfg.cache_dir, held_out=args.held_out, seed=args.seed,
                            checkpoint=args.checkpoint)


def evaluate_at_node(state: Path, cache: Path, *, held_out: Path | None, seed: int,
                     checkpoint: Path | None = None) -> int:
    """``medsynth node evaluate``: aggregate-only evaluation on local data of ``checkpoint``, by
    default the kept global model (the final one once the server has sent it). A pair model is
    judged against the cache's pairs (``common.evaluation.evaluate.evaluate_pair_model``); a cache
    without masks is refused (``PairCacheRequired``, exit 2)."""
    from common.config import GLOBAL_MODEL_DIR, ConfigError
    from common.errors import MissingFile
    from common.evaluation.evaluate import EvaluateOptions, evaluate, format_evaluation

    models = state / GLOBAL_MODEL_DIR
    if checkpoint is not None and not checkpoint.exists():
        raise MissingFile(f"--checkpoint {checkpoint}: no such file or folder")
    if checkpoint is None and not any(models.glob("round-*.safetensors")):
        raise ConfigError(f"no global model at {models} yet: the node keeps the newest model the server sends "
                          "with each training round, and the final one after the last round; evaluate after "
                          "this hospital has taken part in one")
    result = evaluate(EvaluateOptions(
        checkpoint=checkpoint if checkpoint is not None else models, reference=cache, out=state / "evaluation",
        held_out=held_out,
        aggregate_only=True, cache_dir=state / "evaluation-cache", seed=seed))
    print(format_evaluation(result))
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    """``medsynth node augment``: see :func:`client.augment.augment_site`."""
    from client.augment import augment_site

    state, cache = _site_dirs(args)
    result = augment_site(state, args.label, args.n, cache_dir=cache, checkpoint=args.checkpoint, out=args.out,
                          seed=args.seed, latent_scale=args.latent_scale, candidates=args.candidates, fmt=args.format,
                          say=print)
    p = result.provenance
    eps = {s: round(v.epsilon, 4) for s, v in p.sites.items()}
    what = "image–mask pair(s)" if result.pairs else "image(s)"
    print(f"wrote {args.n} synthetic {what} of class {result.label} to {result.out} (beside the cache {cache}, "
          f"not in it); sidecar {result.out / _SIDECAR}")
    if result.pairs:
        print("each mask has its image's name: masks/<class>/<name>.png (png, dicom; with dicom also a DICOM SEG "
              "<name>.seg.dcm beside the image), or 'masks' in synthetic.npz")
    print(f"model {p.model_sha256[:12]}… round {p.round}; ε per hospital {eps}"
          + ("  (this hospital only: the kept model does not list the others)" if result.own_ledger_only else ""))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """``medsynth node train-classifier``: see :func:`client.augment.compare_at_site`."""
    from client.augment import COMPARISON_DIR, compare_at_site

    state, cache = _site_dirs(args)
    table, record = compare_at_site(state, cache_dir=cache, synthetic=args.synthetic or (), label=args.label,
                                    extra=args.extra, all_classes=args.all_classes, seed=args.seed,
                                    bootstrap=args.bootstrap, epochs=args.epochs, repeats=args.repeats)
    print(f"training images per class {record['train_counts']}; rare class {record['rare']}, "
          f"+{record['extra']} images in (c) and (d); {record['test_images']} test images "
          f"({record['test_patients']} patients)")
    print(table)
    print("percentages; [95 % bootstrap interval over test patients]; Δ: paired difference against (a)")
    print(f"numbers: {state / COMPARISON_DIR / 'comparison.json'}")
    return 0


# --------------------------------------------------------------------------------- certs
def cmd_certs_node(args: argparse.Namespace) -> int:
    """``medsynth certs node``: this hospital's auth key pair and signing key, made here."""
    from common.certs import create_node_auth_keys, create_secagg_identity, member_lines, read_public_keys

    auth = create_node_auth_keys(args.out, args.site)
    secagg = create_secagg_identity(args.out, args.site)
    print(f"send to the operator: {auth.public}  {secagg.public}\n"
          f"keep here (0600):     {auth.private}  {secagg.private}")
    print("tell the other hospitals, out of band, your fingerprint:")
    print(member_lines(read_public_keys([secagg.public])))
    return 0


def cmd_certs_fingerprint(args: argparse.Namespace) -> int:
    """``medsynth certs fingerprint``: node.toml ``[consortium.members]`` lines to check out of band."""
    from common.certs import member_lines, read_public_keys

    print("[consortium.members]  # check every line with that hospital out of band before pinning it")
    print(member_lines(read_public_keys(args.entries)))
    return 0
