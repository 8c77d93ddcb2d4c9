"""The consortium operator's commands: ``medsynth server …`` and the operator's ``medsynth certs …``.

    medsynth server start --config server.toml            SuperLink (TLS, node auth, SQLite) + the run
    medsynth server status --config server.toml           rounds, participants, ε per hospital
    medsynth server fab-hash                              SHA-256 of the app bundle hospitals allow
    medsynth certs ca --out DIR                           the consortium CA
    medsynth certs server --ca DIR --host NAME --out DIR  the SuperLink's TLS certificate
    medsynth certs roster --out roster.json FILE...       the roster from hospitals' <site>.secagg.json

Registered by ``medsynth.cli``; it imports common/ and server/ only.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from common.flower import app_dir

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parsers(sub: SubParsers) -> None:
    """Add ``server`` and its sub-commands to the ``medsynth`` parser."""
    server = sub.add_parser("server", help="the consortium's aggregation server",
                            description="The SuperLink (TLS, node authentication, SQLite state) and the run.")
    ssub = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    p = ssub.add_parser("start", help="start the SuperLink and run (or resume) the federation",
                        description="Start the SuperLink with TLS and node authentication, register the "
                                    "hospitals of server.toml, and run the training to its last round, "
                                    "resuming from the last good checkpoint after a crash.")
    p.add_argument("--config", type=Path, required=True, help="server.toml (see deploy/server.example.toml)")
    p.set_defaults(func=cmd_start)
    p = ssub.add_parser("status", help="rounds done, who took part, ε per hospital",
                        description="Read the server's state: rounds completed, who took part, ε per hospital.")
    p.add_argument("--config", type=Path, required=True, help="server.toml")
    p.set_defaults(func=cmd_status)
    p = ssub.add_parser("fab-hash", help="SHA-256 of the app bundle `server start` submits (for node allow-lists)",
                        description="Print the SHA-256 of the app bundle `medsynth server start` submits. "
                                    "Hospitals list it in node.toml [apps] allowed-fab-sha256.")
    p.set_defaults(func=cmd_fab_hash)


def add_certs_commands(csub: SubParsers) -> None:
    """Add the operator's ``certs`` sub-commands (``ca``, ``server``, ``roster``)."""
    p = csub.add_parser("ca", help="the consortium CA (server operator)",
                        description="Make the consortium's CA: ca.pem goes to the server and every hospital, "
                                    "ca.key stays offline.")
    p.add_argument("--out", type=Path, required=True, help="folder for ca.pem (share) and ca.key (keep)")
    p.add_argument("--name", default="medsynth consortium CA", help="the CA's common name")
    p.set_defaults(func=cmd_certs_ca)
    p = csub.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA",
                        description="Issue the SuperLink's TLS certificate for the names hospitals dial.")
    p.add_argument("--ca", type=Path, required=True, help="folder holding ca.pem and ca.key")
    p.add_argument("--host", action="append", required=True,
                   help="name or IP hospitals dial (repeat for several); localhost and 127.0.0.1 are added")
    p.add_argument("--out", type=Path, required=True, help="folder for server.pem and server.key")
    p.set_defaults(func=cmd_certs_server)
    p = csub.add_parser("roster", help="combine hospitals' <site>.secagg.json into roster.json",
                        description="Combine the hospitals' <site>.secagg.json files into roster.json, one "
                                    "key per site, and print each fingerprint.")
    p.add_argument("--out", type=Path, required=True, help="roster.json to write (give it to every hospital)")
    p.add_argument("entries", type=Path, nargs="+", help="<site>.secagg.json files")
    p.set_defaults(func=cmd_certs_roster)


def fab_hash_of_app(folder: Path) -> str:
    """SHA-256 of the FAB ``flwr run``/``flwr build`` makes from ``folder`` (deterministic).

    The digest a hospital's FAB gate (``client.fab_gate.fab_sha256``) computes of the bundle it receives.
    """
    from common.flower.fab import build_fab

    return hashlib.sha256(build_fab(folder)).hexdigest()


# -------------------------------------------------------------------------------- server
def cmd_start(args: argparse.Namespace) -> int:
    """``medsynth server start``: SuperLink and the run, to its last round."""
    from common.dp.plan import fresh_hospital_line
    from server.daemon import start_server
    from server.server_config import ServerDeployConfig

    cfg = ServerDeployConfig.load(args.config, app_dir())
    print(fresh_hospital_line(cfg.run_config()), flush=True)  # what the run will spend at each hospital
    start_server(cfg, say=lambda line: print(line, flush=True))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``medsynth server status``: rounds, participants, ε per hospital."""
    from server.daemon import server_status
    from server.server_config import ServerDeployConfig

    print(server_status(ServerDeployConfig.load(args.config, app_dir())))
    return 0


def cmd_fab_hash(args: argparse.Namespace) -> int:
    """``medsynth server fab-hash``: what hospitals put on their app allow-list."""
    print(fab_hash_of_app(app_dir()))
    return 0


# --------------------------------------------------------------------------------- certs
def cmd_certs_ca(args: argparse.Namespace) -> int:
    """``medsynth certs ca``: the consortium's CA."""
    from common.certs import create_ca

    files = create_ca(args.out, name=args.name)
    print(f"CA certificate {files.public} (give to the server and every hospital)\n"
          f"CA key         {files.private} (0600; keep offline)")
    return 0


def cmd_certs_server(args: argparse.Namespace) -> int:
    """``medsynth certs server``: the SuperLink's TLS certificate, signed by the CA."""
    from common.certs import KeyPairFiles, issue_server_certificate

    files = issue_server_certificate(KeyPairFiles(args.ca / "ca.pem", args.ca / "ca.key"), args.host, args.out)
    print(f"server certificate {files.public}\nserver key         {files.private} (0600)")
    return 0


def cmd_certs_roster(args: argparse.Namespace) -> int:
    """``medsynth certs roster``: roster.json from the hospitals' public signing keys."""
    from common.certs import build_roster, member_lines

    roster = build_roster(args.entries, args.out)
    print(f"roster {args.out}: {', '.join(sorted(roster.keys))}")
    print(member_lines(roster.keys))
    return 0
