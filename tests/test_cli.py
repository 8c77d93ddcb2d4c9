"""The ``medsynth`` command: every help page, one line per user error, and the hospital's side alone.

A hospital install holds common/, client/ and medsynth/ only; the subprocess tests here hide
server/ and simulation/ from the interpreter to run the hospital's commands as it would.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import client.cli
from common.errors import EXIT_RESTARTABLE, UserError
from medsynth.cli import SIDES, build_parser, main

REPO = Path(__file__).resolve().parents[1]

# run medsynth with server/ and simulation/ not importable, as in the hospital image
HOSPITAL_ONLY = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("server", "simulation"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from medsynth.cli import main
code = main(sys.argv[1:])
assert not any(m.partition(".")[0] in ("server", "simulation") for m in sys.modules), "imported"
sys.exit(code)
"""


def _medsynth(*args: str, hospital_only: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = ["-c", HOSPITAL_ONLY] if hospital_only else ["-m", "medsynth"]
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, check=False)


def _listed(help_text: str) -> set[str]:
    """The commands a help page lists (indented four spaces under COMMAND)."""
    return set(re.findall(r"^    ([a-z-]+)", help_text, flags=re.M))


Leaf = tuple[tuple[str, ...], argparse.ArgumentParser]


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every command that runs something, with its words (``("node", "start")``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, child in subs[0].choices.items() for leaf in _leaves(child, (*path, name))]


@pytest.mark.parametrize("args", [[], ["node"], ["server"], ["simulate"], ["certs"], ["evaluate"], ["sample"],
                                  ["audit"]])
def test_help_pages_work(args: list[str]) -> None:
    # act
    done = _medsynth(*args, "--help")
    # assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: medsynth {' '.join(args)}".rstrip())
    assert "Traceback" not in done.stderr


def test_every_command_explains_itself_and_has_a_handler() -> None:
    # act
    leaves = _leaves(build_parser())
    # assert: today's commands all exist, each with a description and a handler
    words = {path for path, _ in leaves}
    assert {("simulate",), ("evaluate",), ("sample",), ("audit",), ("node", "prepare"), ("node", "privacy"),
            ("node", "start"), ("node", "status"), ("node", "audit"), ("node", "evaluate"), ("node", "augment"),
            ("node", "train-classifier"), ("server", "start"),
            ("server", "status"), ("server", "fab-hash"), ("certs", "ca"), ("certs", "server"), ("certs", "node"),
            ("certs", "roster"), ("certs", "fingerprint")} == words
    for path, leaf in leaves:
        assert leaf.description, f"medsynth {' '.join(path)} --help says nothing"
        assert callable(leaf.get_default("func")), path


def _pages(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every help page: the root, each command group and each command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(path, parser), *(page for s in subs for name, child in s.choices.items()
                              for page in _pages(child, (*path, name)))]


def _entries(help_text: str) -> dict[str, str]:
    """Option or argument → its whole help entry (first line indented two spaces, the rest deeper)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("   ") and current is not None:
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_help_page_says_each_default_once() -> None:
    # prepare
    pages = _pages(build_parser())
    # act: each page as `medsynth … --help` prints it, cut into one entry per option
    checked = 0
    for path, page in pages:
        entries = _entries(page.format_help())
        for action in page._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            entry = entries[action.option_strings[0]]
            said = len(re.findall(r"\bdefault\b", entry, flags=re.IGNORECASE))
            meaningful = action.default not in (None, False, argparse.SUPPRESS)
            # assert: a default is said at most once, and a real value (32, 0.5, iid) exactly once
            assert said <= 1, f"medsynth {' '.join(path)}: {entry}"
            assert said == 1 or not meaningful, f"medsynth {' '.join(path)} hides its default: {entry}"
            checked += 1
    assert len(pages) == 24 and checked > 60  # every page walked, not an empty loop


def test_the_dispatch_table_names_each_sides_commands() -> None:
    # prepare: the commands each side's module adds, asked one side at a time
    for side in SIDES:
        parser = build_parser([side.commands[0]])
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        # assert: the dispatcher loads only that side, which adds exactly what the table says
        assert set(subs.choices) == {*side.commands, *(["certs"] if side.certs else [])}


def test_a_user_error_is_one_line_and_exit_code_2() -> None:
    # act: a command whose options contradict nothing but lack what it needs
    done = _medsynth("node", "privacy")
    # assert
    assert done.returncode == 2
    assert done.stderr == "medsynth: error: give --ledger ledger.json or --config node.toml\n"
    assert done.stdout == ""


def test_a_restartable_user_error_exits_1_and_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # prepare
    class Crashed(UserError):
        exit_code = EXIT_RESTARTABLE

    def crash(args: argparse.Namespace) -> int:
        raise Crashed("the server stopped; start it again")

    def bug(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug")

    # act
    monkeypatch.setattr(client.cli, "cmd_audit", crash)
    code = main(["node", "audit", "--log", str(tmp_path / "audit.jsonl")])
    err = capsys.readouterr().err
    monkeypatch.setattr(client.cli, "cmd_audit", bug)
    # assert
    assert code == 1 and err == "medsynth: error: the server stopped; start it again\n"
    with pytest.raises(ZeroDivisionError):
        main(["node", "audit", "--log", str(tmp_path / "audit.jsonl")])


def test_client_cli_imports_nothing_of_server_or_simulation() -> None:
    # prepare: every import in client/cli.py, at module level or inside a command
    tree = ast.parse((REPO / "client" / "cli.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    # assert
    assert imported and not [m for m in imported if m.partition(".")[0] in ("server", "simulation")]


def test_the_hospital_runs_its_commands_without_server_and_simulation(tmp_path: Path) -> None:
    # act
    root_help = _medsynth("--help", hospital_only=True)
    node_help = _medsynth("node", "--help", hospital_only=True)
    certs_help = _medsynth("certs", "--help", hospital_only=True)
    keys = _medsynth("certs", "node", "--site", "site-0", "--out", str(tmp_path), hospital_only=True)
    pins = _medsynth("certs", "fingerprint", str(tmp_path / "site-0.secagg.json"), hospital_only=True)
    server = _medsynth("server", "status", "--config", "server.toml", hospital_only=True)
    # assert: the hospital's commands run; the operator's and the research commands are not offered
    for done in (root_help, node_help, certs_help, keys, pins):
        assert done.returncode == 0, done.stderr
    assert _listed(root_help.stdout) == {"node", "certs"}
    assert _listed(certs_help.stdout) == {"node", "fingerprint"}
    assert pins.stdout.startswith("[consortium.members]") and "site-0 = " in pins.stdout
    assert server.returncode == 2 and "invalid choice: 'server'" in server.stderr
