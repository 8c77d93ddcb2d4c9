"""``medsynth``: the command a hospital ML engineer types.

    medsynth simulate [options]              N virtual hospitals on this machine (default demo)
    medsynth node prepare --data DIR --out CACHE
                                             DICOM folder → local training cache, with a report
    medsynth node privacy --ledger FILE      privacy spent per run and round, from the ledger
    medsynth node start --config node.toml   the hospital daemon (see simulation/cli_deploy.py)
    medsynth server start --config server.toml
    medsynth certs ca|server|node|roster     keys and certificates

Errors a user can fix are printed as one ``error:`` line (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

from client.ledger import (
    AuditLogBehind,
    LedgerCorrupt,
    LedgerMismatch,
    LedgerMissing,
    LedgerRolledBack,
    PrivacyLedger,
)
from client.prepare.pipeline import PrepareError, load_or_create_salt, prepare_site
from common.config import ConfigError, parse_class_names
from common.dataset import DatasetError
from common.dicom.read import DicomRejected
from common.dp.accounting import PrivacyBudgetExceeded, epsilon_of
from simulation import cli_deploy, cli_evaluate
from simulation.partition import PartitionError, SourceDataError
from simulation.superlink import SuperLinkError

USER_ERRORS = (
    ConfigError,
    DatasetError,
    DicomRejected,
    LedgerCorrupt,
    LedgerMismatch,
    LedgerMissing,
    LedgerRolledBack,
    AuditLogBehind,
    PartitionError,
    PrepareError,
    PrivacyBudgetExceeded,
    SourceDataError,
    SuperLinkError,
    FileNotFoundError,
    *cli_evaluate.USER_ERRORS,
)


class _AppDefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a run option's default (``None``: the app's, from ``[tool.flwr.app.config]``) as that value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        from simulation.runner import RUN_OPTIONS  # read only when help is printed

        text = action.help or ""
        if action.default is None and action.dest in RUN_OPTIONS:
            from common.config import app_defaults

            key = RUN_OPTIONS[action.dest]
            return f"{text} (default: {app_defaults()[key]}, the app's {key})"
        return super()._get_help_string(action)


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="run N virtual hospitals through Flower's Simulation Engine",
        description=(
            "Train a DP-GAN across N virtual hospitals on this machine. Each hospital's data is "
            "written as DICOM and prepared like a real node's; the run uses its own Flower "
            "SuperLink (own FLWR_HOME and port) and stops it afterwards. Results: OUT/summary.json, "
            "OUT/samples/*.png, OUT/checkpoints/, and each hospital's privacy ledger."
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
    p.add_argument("--cpus-per-site", type=int, default=1, help="whole CPUs reserved per virtual hospital")
    p.add_argument("--device", default=None,
                   help="auto (CUDA when a GPU is visible to the virtual hospitals, else CPU), cpu, cuda")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    p.add_argument("--plain-aggregation", action="store_true",
                   help="turn secure aggregation OFF: the server then sees every hospital's update "
                        "(default: secure aggregation, the server learns only the sum)")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT's checkpoints and ledgers and continue from the last good round")
    p.add_argument("--reference", type=Path, default=None,
                   help="real images (MedMNIST .npz or prepared cache) to evaluate the final model against; "
                        "results go to summary.json under 'evaluation' and to report.html")


def _node_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--force", action="store_true", help="rebuild even if the folder did not change")
    p.add_argument("--list-rejected", type=Path, default=None, metavar="FILE",
                   help="write every rejected file with its reason, detail and fix to this CSV (names "
                        "files: keep it at the hospital; implies --force; outside DATA)")
    q = nsub.add_parser(
        "privacy",
        help="print the privacy ledger: ε spent, budget left, per run and round",
        description="Read a hospital's privacy ledger and recompute ε from its full history.",
    )
    q.add_argument("--ledger", type=Path, default=None, help="the hospital's ledger.json")
    q.add_argument("--config", type=Path, default=None,
                   help="node.toml instead of --ledger (deployed node); also checks the ledger against its audit log")
    q.add_argument("--audit-log", type=Path, default=None,
                   help="with --ledger: the hospital's audit.jsonl, to check the ledger was not deleted or rolled back")
    cli_deploy.add_node_parsers(nsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsynth",
        description=(
            "Federated, differentially private GAN for synthetic medical images. Each hospital trains "
            "locally with DP-SGD (patient-level privacy, ledger-enforced budget); the server averages."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _simulate_parser(sub)
    _node_parser(sub)
    cli_evaluate.add_parsers(sub)
    cli_deploy.add_certs_parser(sub)
    cli_deploy.add_server_parser(sub)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulation.runner import SimulateOptions, simulate

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
            reference=args.reference,
        )
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
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
    )
    print(report.format())
    print(f"cache: {args.out}  (report: {args.out / 'prepare_report.json'})")
    if args.list_rejected is not None:
        print(f"rejected files: {args.list_rejected}")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: opacus calls logging.basicConfig() when imported, which would make this a no-op
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        force=True)
    try:
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command in ("evaluate", "sample"):
            return cli_evaluate.run(args)
        if args.command == "certs":
            return cli_deploy.run_certs(args)
        if args.command == "server":
            return cli_deploy.run_server(args)
        if args.node_command == "prepare":
            return cmd_prepare(args)
        if args.node_command == "privacy":
            return cmd_privacy(args)
        return cli_deploy.run_node(args)
    except USER_ERRORS + cli_deploy.user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
