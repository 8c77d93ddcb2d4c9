"""``medsynth``: one command for the hospital, the consortium's server and research.

    medsynth node …                     hospital-side commands                   (client/cli.py)
    medsynth server …                   the consortium's aggregation server      (server/cli.py)
    medsynth certs …                    keys and certificates: node, fingerprint (client/cli.py);
                                        ca, server, roster                       (server/cli.py)
    medsynth simulate|evaluate|sample|audit  research commands                   (simulation/cli.py)

A side's command module is imported only when one of its commands is asked for (every installed
one for ``medsynth --help``), and only if its package is installed: a hospital image holding
common/, client/ and medsynth/ runs ``medsynth node …`` and ``medsynth certs node|fingerprint``
without server/ or simulation/. Every command puts its handler on its parser
(``set_defaults(func=…)``); :func:`main` calls it.

Errors print here and only here: a :class:`common.errors.UserError`, or a path that does not
exist, is one ``medsynth: error: …`` line on stderr and the error's exit code; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from common.cli_help import DefaultsOnceHelpFormatter
from common.errors import EXIT_FIX_CONFIG, EXIT_INTERRUPTED, UserError

PROG = "medsynth"
CERTS = "certs"


@dataclass(frozen=True)
class Side:
    """A command module, the top-level commands its ``add_parsers`` adds, and whether it adds
    sub-commands to ``certs`` (its ``add_certs_commands``)."""

    module: str
    commands: tuple[str, ...]
    certs: bool


SIDES: tuple[Side, ...] = (
    Side("client.cli", ("node",), certs=True),
    Side("server.cli", ("server",), certs=True),
    Side("simulation.cli", ("simulate", "evaluate", "sample", "audit"), certs=False),
)


def installed(module: str) -> bool:
    """Whether ``module``'s top-level package is importable in this install (nothing is imported)."""
    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _command_of(argv: Sequence[str]) -> str | None:
    """The top-level command: the first argument that is not an option (the root has only flags)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _sides_for(command: str | None) -> list[tuple[Side, ModuleType]]:
    """The installed sides that ``command`` needs, imported; every installed side if it names none."""
    if command == CERTS:
        wanted = [s for s in SIDES if s.certs]
    else:
        wanted = [s for s in SIDES if command in s.commands] or list(SIDES)
    return [(side, importlib.import_module(side.module)) for side in wanted if installed(side.module)]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``medsynth`` parser, with the commands of the sides ``argv`` needs (all installed ones if None)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Federated, differentially private GAN for synthetic medical images. Each hospital trains "
            "locally with DP-SGD (patient-level privacy, ledger-enforced budget); the server averages."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sides = _sides_for(None if argv is None else _command_of(argv))
    for _, module in sides:
        module.add_parsers(sub)
    certs_sides = [module for side, module in sides if side.certs]
    if certs_sides:
        certs = sub.add_parser(CERTS, help="make the consortium's keys and certificates",
                               description="Keys and certificates. Private keys are written 0600 and never "
                                           "overwritten; each is made on the machine that uses it.")
        csub = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
        for module in certs_sides:
            module.add_certs_commands(csub)
    _say_defaults_once(parser)
    return parser


def _say_defaults_once(parser: argparse.ArgumentParser) -> None:
    """Every help page in the tree shows an option's default once (``common.cli_help``); a page
    with its own formatter of that kind (``simulate``'s, which names the app's defaults) keeps it."""
    formatter = parser.formatter_class
    if not (isinstance(formatter, type) and issubclass(formatter, DefaultsOnceHelpFormatter)):
        parser.formatter_class = DefaultsOnceHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _say_defaults_once(child)


def _refuse(message: str, exit_code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging, run the command; a user's error is one line and its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    # force: opacus calls logging.basicConfig() when imported, which would make this a no-op
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        force=True)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except UserError as exc:
        return _refuse(str(exc), exc.exit_code)
    except FileNotFoundError as exc:  # a path given on the command line or in a config file: the OS names it
        return _refuse(str(exc), EXIT_FIX_CONFIG)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
