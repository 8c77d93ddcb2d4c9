"""The app bundle holds exactly server/, client/, common/ (plus pyproject.toml), and imports from itself alone."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from common.flower import app_dir
from common.flower.fab import build_fab

ROOT = Path(__file__).resolve().parents[1]


def test_the_app_bundle_holds_only_the_app_packages() -> None:
    # the bundle `flwr run` submits (common.flower.fab builds Flower's bytes, test_audit_gate checks)
    fab = build_fab(app_dir())
    tops = {name.split("/")[0] for name in zipfile.ZipFile(io.BytesIO(fab)).namelist()}
    assert tops == {".info", "pyproject.toml", "server", "client", "common"}
    assert len(fab) < 10 * 2**20  # Flower's bundle limit


#: Run with ``python -I`` in a fresh interpreter: argv = [unpacked bundle, checkout, module...].
#: The checkout's editable-install finder (and any path entry to the checkout) is removed first,
#: so a module is found in the bundle or not at all. Prints one JSON object.
IMPORT_FROM_BUNDLE = """
import importlib, json, sys
from pathlib import Path

bundle, checkout, modules = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3:]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path[:] = [str(bundle)] + [p for p in sys.path if p and Path(p).resolve() != checkout]
sys.path_importer_cache.clear()
failures = {}
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures[name] = f"{type(exc).__name__}: {exc}"
first_party = {"common", "client", "server", "simulation", "medsynth"}
elsewhere = {name: str(getattr(mod, "__file__", None)) for name, mod in list(sys.modules.items())
             if name.split(".")[0] in first_party
             and not Path(str(getattr(mod, "__file__", None) or "/")).resolve().is_relative_to(bundle)}
print(json.dumps({"failures": failures, "elsewhere": elsewhere, "imported": len(modules)}))
"""


def test_every_module_in_the_app_bundle_imports_from_the_bundle_alone(tmp_path: Path) -> None:
    # The bundle `flwr run` submits and `medsynth server fab-hash` hashes (both build it this way).

    bundle = tmp_path / "fab"
    with zipfile.ZipFile(io.BytesIO(build_fab(app_dir()))) as fab:
        fab.extractall(bundle)
    modules = sorted(
        ".".join(p.relative_to(bundle).with_suffix("").parts[:-1] if p.name == "__init__.py"
                 else p.relative_to(bundle).with_suffix("").parts)
        for p in bundle.rglob("*.py")
    )
    assert {"client.app", "server.app", "client.daemon", "server.daemon", "common.flower"} <= set(modules)
    proc = subprocess.run([sys.executable, "-I", "-c", IMPORT_FROM_BUNDLE, str(bundle), str(ROOT), *modules],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_HOME": str(tmp_path / ".flwr")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}
    assert report["elsewhere"] == {}  # every first-party module came from the bundle
    assert report["imported"] == len(modules)
