"""``medsynth … --help`` starts without the heavy libraries.

Every ``medsynth`` command used to take about 6.5 s to start, ``--help`` included, because the
parsers imported torch, Flower and pydicom through the modules that run the commands. Each side's
command module now imports them in the command that needs them. What is checked is what was
imported, not how long it took: a help page must not import any of :data:`HEAVY` (a timing would
depend on the machine and the disk cache).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Libraries no help page may import (each costs from a few hundred ms to seconds to import).
HEAVY = frozenset({"torch", "opacus", "flwr", "pydicom", "matplotlib", "sklearn", "scipy", "ray", "torchmetrics"})


def _imported_by(argv: list[str]) -> set[str]:
    """Top-level packages imported by ``python -X importtime -m medsynth ARGV`` (from its stderr)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "medsynth", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: medsynth"), done.stdout[:200]
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "medsynth.cli" in names, "no import trace: -X importtime no longer writes to stderr"
    return {name.split(".", 1)[0] for name in names}


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["node", "--help"],
    ["node", "privacy", "--help"],
    ["node", "start", "--help"],
    ["server", "--help"],
    ["certs", "--help"],
    ["simulate", "--help"],
    ["evaluate", "--help"],
    ["sample", "--help"],
], ids=lambda argv: " ".join(argv))
def test_a_help_page_imports_no_heavy_library(argv: list[str]) -> None:
    heavy = _imported_by(argv) & HEAVY
    assert heavy == set(), f"`medsynth {' '.join(argv)}` imports {sorted(heavy)}: import them in the command"


_EVERY_PAGE = """
import argparse, sys
from medsynth.cli import build_parser

def pages(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from pages(child)

count = sum(1 for page in pages(build_parser()) if page.format_help())
print(count)
print(" ".join(sorted({name.split(".", 1)[0] for name in sys.modules})))
"""


def test_no_help_page_in_the_whole_tree_imports_a_heavy_library() -> None:
    # one process builds the parser of every installed side (what `medsynth --help` does) and
    # formats every page, sub-commands of sub-commands included: together they import nothing heavy
    done = subprocess.run([sys.executable, "-c", _EVERY_PAGE], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    count, modules = done.stdout.splitlines()
    assert int(count) >= 15, f"only {count} help pages: the walk no longer reaches the sub-commands"
    heavy = set(modules.split()) & HEAVY
    assert heavy == set(), f"formatting the help pages imports {sorted(heavy)}"

