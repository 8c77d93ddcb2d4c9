"""Deployment commands of ``medsynth``: keys and certificates, the server, the hospital node.

    medsynth certs ca --out DIR                       consortium CA (server operator)
    medsynth certs server --ca DIR --host NAME --out DIR   the SuperLink's TLS certificate
    medsynth certs node --site ID --out DIR           a hospital's auth + signing keys (at the hospital)
    medsynth certs roster --out roster.json FILE...   the roster from hospitals' <site>.secagg.json
    medsynth server start --config server.toml        SuperLink (TLS, node auth, SQLite) + the run
    medsynth server status --config server.toml       rounds, participants, ε per hospital
    medsynth server fab-hash                          SHA-256 of the app bundle hospitals allow
    medsynth node start --config node.toml            the hospital daemon
    medsynth node audit --config node.toml            every message that left the hospital
    medsynth node evaluate --config node.toml         the newest global model against local images
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_certs_parser(sub: SubParsers) -> None:
    certs = sub.add_parser("certs", help="make the consortium's keys and certificates",
                           description="Keys and certificates. Private keys are written 0600 and never "
                                       "overwritten; each is made on the machine that uses it.")
    csub = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    p = csub.add_parser("ca", help="the consortium CA (server operator)")
    p.add_argument("--out", type=Path, required=True, help="folder for ca.pem (share) and ca.key (keep)")
    p.add_argument("--name", default="medsynth consortium CA", help="the CA's common name")
    p = csub.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA")
    p.add_argument("--ca", type=Path, required=True, help="folder holding ca.pem and ca.key")
    p.add_argument("--host", action="append", required=True,
                   help="name or IP hospitals dial (repeat for several); localhost and 127.0.0.1 are added")
    p.add_argument("--out", type=Path, required=True, help="folder for server.pem and server.key")
    p = csub.add_parser("node", help="a hospital's SuperNode auth key pair and secure-aggregation signing key",
                        description="Run at the hospital. Send <site>.auth.pub and <site>.secagg.json to the "
                                    "consortium operator; the .key files never leave this machine.")
    p.add_argument("--site", required=True, help="the hospital's site id, e.g. site-0")
    p.add_argument("--out", type=Path, required=True, help="folder for the four files")
    p = csub.add_parser("roster", help="combine hospitals' <site>.secagg.json into roster.json")
    p.add_argument("--out", type=Path, required=True, help="roster.json to write (give it to every hospital)")
    p.add_argument("entries", type=Path, nargs="+", help="<site>.secagg.json files")
    p = csub.add_parser("fingerprint", help="signing-key fingerprints to pin in node.toml [consortium.members]",
                        description="Print the SHA-256 fingerprint of each hospital's secure-aggregation "
                                    "signing key, as node.toml lines. Read them to each other out of band "
                                    "(phone, signed letter) before pinning them: the roster alone comes "
                                    "from the operator.")
    p.add_argument("entries", type=Path, nargs="+", help="<site>.secagg.json files or a roster.json")


def add_server_parser(sub: SubParsers) -> None:
    server = sub.add_parser("server", help="the consortium's aggregation server",
                            description="The SuperLink (TLS, node authentication, SQLite state) and the run.")
    ssub = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    p = ssub.add_parser("start", help="start the SuperLink and run (or resume) the federation",
                        description="Start the SuperLink with TLS and node authentication, register the "
                                    "hospitals of server.toml, and run the training to its last round, "
                                    "resuming from the last good checkpoint after a crash.")
    p.add_argument("--config", type=Path, required=True, help="server.toml (see deploy/server.example.toml)")
    p = ssub.add_parser("status", help="rounds done, who took part, ε per hospital")
    p.add_argument("--config", type=Path, required=True, help="server.toml")
    ssub.add_parser("fab-hash", help="SHA-256 of the app bundle `server start` submits (for node allow-lists)")


def add_node_parsers(nsub: SubParsers) -> None:
    p = nsub.add_parser("start", help="run this hospital's node daemon",
                        description="Check node.toml, keys and the server's certificate, prepare the local "
                                    "dataset, then run flower-supernode (outbound TLS only) until stopped.")
    p.add_argument("--config", type=Path, required=True, help="node.toml (see deploy/node.example.toml)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="loopback port of the SuperNode's Runtime API for its own ClientApps")
    p = nsub.add_parser("audit", help="print the audit log: every message that left this hospital")
    p.add_argument("--config", type=Path, default=None, help="node.toml (the log is STATE/audit.jsonl)")
    p.add_argument("--log", type=Path, default=None, help="an audit.jsonl file instead of --config")
    p = nsub.add_parser(
        "evaluate", help="judge the newest global model against this hospital's own images (aggregates only)",
        description="Run `medsynth evaluate` at the hospital: the newest global model the server sent (kept in "
                    "STATE/global-model) against the prepared local images (STATE/cache, split 80/20 by patient). "
                    "Only aggregate numbers are printed and written (STATE/evaluation/evaluation.json); no picture "
                    "of a real image is made and nothing is sent. The local test patients were also training "
                    "patients of the federation; for memorization, and for a TSTR free of that overlap, give "
                    "--held-out: a prepared folder of patients that never took part.")
    p.add_argument("--config", type=Path, required=True, help="node.toml")
    p.add_argument("--held-out", type=Path, default=None,
                   help="prepared cache (`medsynth node prepare`) of patients the federation never saw")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent vectors and the split (default: 0)")


def _app_dir() -> Path:
    from simulation.runner import project_dir

    return project_dir()


def run_certs(args: argparse.Namespace) -> int:
    from common.certs import (
        KeyPairFiles,
        build_roster,
        create_ca,
        create_node_auth_keys,
        create_secagg_identity,
        issue_server_certificate,
        read_public_keys,
    )

    if args.certs_command == "ca":
        files = create_ca(args.out, name=args.name)
        print(f"CA certificate {files.public} (give to the server and every hospital)\n"
              f"CA key         {files.private} (0600; keep offline)")
    elif args.certs_command == "server":
        files = issue_server_certificate(KeyPairFiles(args.ca / "ca.pem", args.ca / "ca.key"), args.host, args.out)
        print(f"server certificate {files.public}\nserver key         {files.private} (0600)")
    elif args.certs_command == "node":
        auth = create_node_auth_keys(args.out, args.site)
        secagg = create_secagg_identity(args.out, args.site)
        print(f"send to the operator: {auth.public}  {secagg.public}\n"
              f"keep here (0600):     {auth.private}  {secagg.private}")
        print("tell the other hospitals, out of band, your fingerprint:")
        print(_member_lines(read_public_keys([secagg.public])))
    elif args.certs_command == "fingerprint":
        print("[consortium.members]  # check every line with that hospital out of band before pinning it")
        print(_member_lines(read_public_keys(args.entries)))
    else:
        roster = build_roster(args.entries, args.out)
        print(f"roster {args.out}: {', '.join(sorted(roster.keys))}")
        print(_member_lines(roster.keys))
    return 0


def _member_lines(keys: dict[str, bytes]) -> str:
    from common.secagg import fingerprint

    return "\n".join(f'{site} = "{fingerprint(pk)}"' for site, pk in sorted(keys.items()))


def run_server(args: argparse.Namespace) -> int:
    from client.fab_gate import fab_hash_of_app

    if args.server_command == "fab-hash":
        print(fab_hash_of_app(_app_dir()))
        return 0
    from server.daemon import server_status, start_server
    from server.server_config import ServerDeployConfig

    cfg = ServerDeployConfig.load(args.config, _app_dir())
    if args.server_command == "status":
        print(server_status(cfg))
        return 0
    start_server(cfg, say=lambda line: print(line, flush=True))
    return 0


def run_node(args: argparse.Namespace) -> int:
    from client.audit import format_entries, read_records
    from client.node_config import NodeDeployConfig
    from common.config import ConfigError

    if args.node_command == "audit":
        if args.log is None and args.config is None:
            raise ConfigError("give --config node.toml or --log audit.jsonl")
        path = args.log if args.log is not None else NodeDeployConfig.load(args.config).audit_path
        print(format_entries(read_records(path)))
        return 0
    if args.node_command == "evaluate":
        cfg = NodeDeployConfig.load(args.config)
        return evaluate_at_node(cfg.state_dir, cfg.cache_dir, held_out=args.held_out, seed=args.seed)
    from client.daemon import start_node

    start_node(NodeDeployConfig.load(args.config), say=lambda line: print(line, flush=True),
               runtime_port=args.runtime_port)
    return 0


def evaluate_at_node(state: Path, cache: Path, *, held_out: Path | None, seed: int) -> int:
    """``medsynth node evaluate``: aggregate-only evaluation of the kept global model on local data."""
    from common.config import GLOBAL_MODEL_DIR, ConfigError
    from common.evaluation.evaluate import EvaluateOptions, evaluate, format_evaluation

    models = state / GLOBAL_MODEL_DIR
    if not any(models.glob("round-*.safetensors")):
        raise ConfigError(f"no global model at {models} yet: the node keeps the newest model the server sends "
                          "with each training round; evaluate after this hospital has taken part in one")
    result = evaluate(EvaluateOptions(
        checkpoint=models, reference=cache, out=state / "evaluation", held_out=held_out,
        aggregate_only=True, cache_dir=state / "evaluation-cache", seed=seed))
    print(format_evaluation(result))
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    from client.audit import AuditLogCorrupt
    from common.certs import CertificateError

    return (AuditLogCorrupt, CertificateError)
