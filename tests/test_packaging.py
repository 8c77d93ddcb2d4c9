"""`flwr build` bundles exactly server/, client/, common/ (plus pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flwr_build_bundles_only_the_app_packages(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / ".flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    flwr = Path(sys.executable).parent / "flwr"
    proc = subprocess.run([str(flwr), "build", "--app", str(ROOT)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fab,) = tmp_path.glob("*.fab")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(fab).namelist()}
    assert tops == {".info", "pyproject.toml", "server", "client", "common"}
    assert fab.stat().st_size < 10 * 2**20  # Flower's bundle limit
