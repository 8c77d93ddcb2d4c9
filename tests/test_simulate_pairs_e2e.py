"""End to end: ``medsynth simulate --pairs`` on phantoms with real Flower processes (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client.ledger import PrivacyLedger
from common.checkpoint import latest_valid_checkpoint
from common.dp.accounting import epsilon_of

pytestmark = pytest.mark.slow


def test_pair_mode_trains_privately_and_is_evaluated_by_segmentation(tmp_path: Path) -> None:
    # prepare: 3 phantom hospitals with lesion masks, one tiny round, no warm start (its pre-training is slow)
    out = tmp_path / "out"
    # act
    proc = subprocess.run(
        [sys.executable, "-m", "medsynth", "simulate", "--pairs", "--out", str(out), "--sites", "3", "--rounds", "1",
         "--epsilon", "8", "--patients-per-site", "6", "--images-per-patient", "2", "--local-steps", "2",
         "--batch-size", "4", "--warm-start-share", "0"],
        capture_output=True, text=True, timeout=600)
    # assert: the run completed under secure aggregation and each hospital's ledger holds its DP steps
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["secure_aggregation"] is True
    for site, s in summary["sites"].items():
        ledger = PrivacyLedger.read(out / s["ledger"])
        assert [c.steps for c in ledger.charges] == [2], site
        assert s["epsilon"] == pytest.approx(epsilon_of(ledger.charges, 1e-5))
        assert 0 < s["epsilon"] <= 8.0
    # every hospital's cache holds pairs; the model is a pair model (D's first convolution reads 2 channels)
    assert (out / "sites" / "site-0" / "dicom" / "masks" / "lesion").is_dir()
    ckpt = latest_valid_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.arrays["d.body.0.weight"].shape[1] == 2
    # the sample grid shows image and mask side by side; the evaluation is the segmentation one
    grid = Image.open(out / "samples" / "round-0001.png")  # 2 classes × 8 pairs of 32 px, pad 2, shown at 2×
    assert grid.size == (2 * 8 * (2 * 32 + 2), 2 * 2 * (32 + 2))
    evaluation = summary["evaluation"]
    assert evaluation["kind"] == "segmentation"
    assert 0 <= evaluation["dice_synthetic"] <= 1 and 0 <= evaluation["agreement_dice"] <= 1
    assert evaluation["dice_real"] > 0  # lesions are learnable from real pairs in 10 epochs (measured 0.57)
