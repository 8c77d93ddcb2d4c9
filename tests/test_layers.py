"""The layers hold: every import in ``common/``, ``client/`` and ``server/``, read with ``ast``.

``common`` imports nothing of ``client``, ``server``, ``simulation`` or the ``medsynth`` CLI;
``client`` and ``server`` import ``common`` (and third-party packages) but not each other, the
simulation harness or the CLI. Imports inside functions count as much as module-level ones,
and so does ``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> first-party top-level packages it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"client", "server", "simulation", "medsynth"}),
    "client": frozenset({"server", "simulation", "medsynth"}),
    "server": frozenset({"client", "simulation", "medsynth"}),
}


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, which is module ``module``
    (an ``__init__.py`` when ``is_package``).

    Relative imports are resolved against ``module``'s package; ``importlib.import_module`` and
    ``__import__`` calls count when their first argument is a string literal.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            if node.module is None:  # from . import x: each x may be a module
                found += [(node.lineno, f"{name}.{alias.name}".lstrip(".")) for alias in node.names]
            else:
                found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """``module:line imports name`` for every import ``module``'s layer forbids."""
    forbidden = FORBIDDEN.get(module.split(".")[0], frozenset())
    return [f"{module}:{line} imports {name}"
            for line, name in imported_modules(source, module, is_package=is_package)
            if name.split(".")[0] in forbidden]


def _modules(package: str) -> list[tuple[str, Path, bool]]:
    """(module name, file, is a package's ``__init__``) of every module under ``package/``."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found.append((".".join(parts[:-1] if is_package else parts), path, is_package))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layers(package: str) -> None:
    modules = _modules(package)
    assert len(modules) > 3, f"found no modules under {package}/"
    violations = [v for module, path, is_package in modules
                  for v in layer_violations(path.read_text(encoding="utf-8"), module, is_package=is_package)]
    assert violations == []


def test_the_checker_catches_planted_violations() -> None:
    planted = """
import os
from common.config import ConfigError

def late():
    from simulation.superlink import LocalSuperLink
    import server.app
    return LocalSuperLink, server.app

class K:
    def method(self):
        import importlib
        return importlib.import_module("simulation.runner")
"""
    assert layer_violations(planted, "client.somewhere") == [
        "client.somewhere:6 imports simulation.superlink",
        "client.somewhere:7 imports server.app",
        "client.somewhere:13 imports simulation.runner",
    ]
    assert layer_violations(planted, "simulation.somewhere") == []  # the harness may import anything
    assert layer_violations("from ..server import app\nfrom . import x\n", "client.daemon") == [
        "client.daemon:1 imports server"
    ]
    assert layer_violations("from ...client import app\n", "common.flower.env") == [
        "common.flower.env:1 imports client"
    ]
    assert layer_violations("from ..server import app\n", "common.flower", is_package=True) == []  # common.server
    assert layer_violations("from ...server import app\n", "common.flower", is_package=True) == [
        "common.flower:1 imports server"
    ]
    assert layer_violations("import medsynth.cli\n", "common.config") == ["common.config:1 imports medsynth.cli"]
    assert layer_violations("from client import app\n", "server.rounds") == ["server.rounds:1 imports client"]
