"""End to end: ``medsynth simulate`` with real Flower processes (SuperLink + Simulation Engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.ledger import PrivacyLedger
from common.checkpoint import latest_valid_checkpoint, load_checkpoint
from common.config import run_config
from common.dp.accounting import epsilon_of
from common.report.plots import SVG_MIME

pytestmark = pytest.mark.slow


def _medsynth(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medsynth", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("sim") / "out"
    proc = _medsynth(
        "simulate", "--out", str(out), "--sites", "3", "--rounds", "2", "--epsilon", "8",
        "--patients-per-site", "16", "--images-per-patient", "3", "--local-steps", "4", "--batch-size", "4",
        "--eval-images", "400",  # the default, 5 × 2400 reference training images, takes minutes: the wiring is tested
        "--pretrain-steps", "50",  # the default 2000 take about 80 s of CPU at the server; the wiring is tested
    )
    return out, proc


def test_three_phantom_hospitals_two_rounds_complete(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # summary layout
    assert summary["rounds_completed"] == 2
    assert summary["secure_aggregation"] is True
    # round 0 is the warm-start release (no losses: nothing trained), then the two GAN rounds
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["sites_trained"] == ["site-0", "site-1", "site-2"] for r in summary["rounds"])
    assert summary["rounds"][0]["loss_d_fake"] is None
    assert "G pre-trained for 50 steps" in (out / "flower.log").read_text()  # --pretrain-steps reached the server
    assert all(np.isfinite(r["loss_d_fake"]) and np.isfinite(r["loss_g"]) for r in summary["rounds"][1:])
    assert set(summary["sites"]) == {"site-0", "site-1", "site-2"}
    for site, s in summary["sites"].items():
        assert {"epsilon", "delta", "steps", "status", "ledger"} <= set(s)
        assert s["status"] == "ok" and s["delta"] == 1e-5 and s["steps"] == 9
        # ledger layout, and epsilon recomputable from it; calibration ends at ≤ budget
        raw = json.loads((out / s["ledger"]).read_text())
        assert raw["accountant"] == "prv" and raw["delta"] == 1e-5 and raw["epsilon_budget"] == 8.0
        first = raw["history"][0]
        assert (first["round"], first["sample_rate"], first["steps"]) == (0, 1.0, 1)
        assert [(h["round"], h["steps"]) for h in raw["history"]][1:] == [(1, 4), (2, 4)]
        assert len({h["run"] for h in raw["history"]}) == 1
        ledger = PrivacyLedger.read(out / s["ledger"])
        assert s["epsilon"] == pytest.approx(epsilon_of(ledger.charges, 1e-5))
        assert 8.0 - 0.05 < s["epsilon"] <= 8.0, site
        share = run_config().warm_start.budget_share  # the app default
        assert (share - 0.01) * 8.0 <= epsilon_of(ledger.charges[:1], 1e-5) <= share * 8.0  # the release's share
    # the summed release is kept for a resumed run
    warm = json.loads((out / "warm_start.json").read_text())
    assert warm["format"] == 1 and len(warm["sum"]) == 2 * (64 + 2 * run_config().warm_start.frequencies + 1)
    # checkpoints: pickle-free, verified, one per round (round 0: the pre-trained G)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["round-0000.safetensors", "round-0001.safetensors", "round-0002.safetensors"]
    ckpt = latest_valid_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.round == 2
    assert load_checkpoint(out / "checkpoints" / names[1]).round == 1
    # samples: one PNG grid per round, one row per class
    for r in (0, 1, 2):
        img = Image.open(out / "samples" / f"round-{r:04d}.png")
        assert img.mode == "L" and img.size[0] > img.size[1] > 0
    # phantoms: evaluated against a phantom population no hospital holds; real beside synthetic
    assert summary["evaluation"]["tstr_auc"] is not None and summary["evaluation"]["n_synthetic"] == 400
    assert (out / "evaluation" / "real_vs_synthetic.png").is_file()
    assert "TSTR AUC" in proc.stdout
    # the user sees where results are and each hospital's epsilon
    assert "ε =" in proc.stdout and str(out) in proc.stdout


def test_report_html_is_written_with_the_plots(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = demo_run
    page = (out / "report.html").read_text()
    for alt in ("Per-round losses", "Epsilon per round", "Epsilon against budget"):  # matplotlib charts
        assert f'<img alt="{alt}" src="data:{SVG_MIME};base64,' in page, alt
    for alt in ("Sample grid round-0001", "Sample grid round-0002", "Real and synthetic images"):
        assert f'<img alt="{alt}" src="data:image/png;base64,' in page, alt
    assert "<td>site-2</td>" in page and "http" not in page  # exact figures; nothing fetched when opened
    assert str(out / "report.html") in proc.stdout


def test_no_flower_process_outlives_the_simulation(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = demo_run
    own = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert own == []


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = _medsynth("simulate", "--out", str(tmp_path / "x"), "--partition", "dirichlet:abc", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("medsynth: error: ") and "Traceback" not in proc.stderr


def test_fixed_noise_small_budget_stops_cleanly_with_status(tmp_path: Path) -> None:
    # prepare: σ=3 fixed, q=1/3 (public), 6 steps a round: ε after 1..4 rounds = 1.23, 1.72, 2.11, 2.45
    out = tmp_path / "budget"
    # act
    proc = _medsynth(
        "simulate", "--out", str(out), "--sites", "3", "--rounds", "4", "--epsilon", "2.0",
        "--noise-multiplier", "3.0", "--patients-per-site", "12", "--images-per-patient", "2",
        "--local-steps", "6", "--batch-size", "4", "--sample-rate", str(1 / 3), "--warm-start-share", "0",
        "--no-evaluation",
    )
    # assert: the run ended normally, fewer rounds than asked, every site at or below budget
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert "no hospital could train" in summary["stopped_early"]
    assert "evaluation" not in summary and not (out / "evaluation").exists()  # --no-evaluation
    for s in summary["sites"].values():
        assert s["status"] == "budget-exhausted"
        assert s["epsilon"] == pytest.approx(1.72, abs=0.01)
        assert s["steps"] == 12


def test_secure_and_plain_simulations_give_the_same_model(tmp_path: Path) -> None:
    # prepare: identical runs but for the aggregation; noise seeded (simulation-only setting).
    # One round: from round 2 on, the plain float sum (reply order) and the exact ring sum differ
    # in the last float32 bit of the global model, and Adam turns such differences of near-zero
    # gradients into whole-lr steps: measured 1.6e-5 after round 2, round-off, not aggregation.
    from simulation.runner import SimulateOptions, simulate

    def run(secure: bool) -> dict[str, np.ndarray]:
        out = tmp_path / ("secure" if secure else "plain")
        simulate(SimulateOptions(
            out=out, sites=3, rounds=1, epsilon=8.0, noise_multiplier=1.1, patients_per_site=12,
            images_per_patient=2, local_steps=3, batch_size=4, secure_aggregation=secure, warm_start_share=0.0,
            evaluation=False,
            extra_config=(("sim.deterministic-noise", True), ("model.g-width", 16)),
        ), say=lambda _: None)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["secure_aggregation"] is secure and summary["rounds_completed"] == 1
        ckpt = latest_valid_checkpoint(out / "checkpoints")
        assert ckpt is not None
        return ckpt.arrays

    # act
    secure, plain = run(True), run(False)
    # assert: equal within the quantization error (≈1e-11 here) plus float32 rounding
    worst = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in plain)
    assert worst < 1e-6
