"""``report.html`` from a run folder: one offline file with the plots first and the exact figures in tables."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from common.report.html import write_report
from common.report.plots import bar_chart, line_chart, nice_ticks
from common.report.samples import save_png


def _run_folder(root: Path, rounds: int = 3) -> Path:
    """server_state.json, summary.json and sample grids as a 3-site simulation leaves them."""
    records = []
    for r in range(1, rounds + 1):
        privacy = {f"site-{s}": {"status": "ok", "epsilon": 2.5 * r + s, "epsilon_budget": 10.0, "delta": 1e-5,
                                 "steps": 20 * r} for s in range(3)}
        records.append({"round": r, "sites_trained": sorted(privacy), "sites_budget_exhausted": [],
                        "loss_d_fake": 1.5 - 0.1 * r, "loss_g": 0.7 + 0.2 * r, "privacy": privacy, "failures": [],
                        "seconds": 12.5})
    (root / "server_state.json").write_text(json.dumps({"rounds": records, "finished": True,
                                                        "secure_aggregation": True}))
    sites = {f"site-{s}": {"epsilon": 7.5 + s, "delta": 1e-5, "epsilon_budget": 10.0, "steps": 60, "status": "ok"}
             for s in range(3)}
    (root / "summary.json").write_text(json.dumps({"run_id": 42, "sites": sites, "wall_seconds": 99.0}))
    for r in range(1, rounds + 1):
        save_png(np.full((20, 40), 40 * r, np.uint8), root / "samples" / f"round-{r:04d}.png")
    return root


def _images(page: str) -> dict[str, Image.Image]:
    """alt text → decoded PNG of every inlined image."""
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)
    return {alt: Image.open(io.BytesIO(base64.b64decode(data))) for alt, data in found}


def test_report_holds_loss_epsilon_and_sample_plots_and_tables(tmp_path: Path) -> None:
    # prepare
    run = _run_folder(tmp_path)
    # act
    path = write_report(run)
    page = path.read_text()
    images = _images(page)
    # assert: plots are real PNGs, inlined (no external reference)
    assert path == run / "report.html"
    assert {"Per-round losses", "Epsilon per round", "Epsilon against budget"} <= set(images)
    assert {f"Sample grid round-000{r}" for r in (1, 2, 3)} <= set(images)
    assert all(img.format == "PNG" and img.size[0] >= 40 for img in images.values())
    assert "http" not in page and "<script" not in page
    # tables: exact figures; ε from summary.json (ledger-recomputed) in the per-site table
    assert "<td>site-2</td><td>9.5</td><td>1e-05</td><td>10</td><td>60</td><td>ok</td>" in page
    assert "<td>3</td><td>site-0, site-1, site-2</td><td>1.2</td><td>1.3</td><td>12.5</td>" in page
    assert "Evaluation" not in page  # no reference given


def test_report_includes_the_evaluation_when_given(tmp_path: Path) -> None:
    # prepare
    run = _run_folder(tmp_path)
    evaluation = {"fd": 12.5, "kid": 0.0123, "tstr_auc": 0.81, "tstr_acc": 0.75, "trtr_auc": 0.95,
                  "trtr_acc": 0.86, "memorization_rate": 0.0, "fd_kind": "domain FD, not Inception FID"}
    pairs = tmp_path / "pairs.png"
    pairs.write_bytes(line_chart({"x": [(0.0, 1.0)]}, title="t", xlabel="x", ylabel="y"))
    # act
    page = write_report(run, evaluation=evaluation, closest_pairs=pairs).read_text()
    # assert
    assert {"TSTR against TRTR", "Closest pairs"} <= set(_images(page))
    assert "<td>TSTR AUC</td><td>0.81</td>" in page and "<td>memorization rate</td><td>0</td>" in page
    assert "not Inception FID" in page


def test_charts_are_pngs_of_the_asked_size_and_ticks_are_round() -> None:
    # act
    line = Image.open(io.BytesIO(line_chart({"a": [(1.0, 0.5), (2.0, 0.7)]}, title="t", xlabel="x", ylabel="y",
                                            hlines={"budget": 1.0}, width=500, height=250)))
    bars = Image.open(io.BytesIO(bar_chart(["s0", "s1"], {"spent": [1.0, 2.0]}, markers={"budget": [3.0, 3.0]},
                                           title="t", ylabel="ε")))
    # assert
    assert line.size == (500, 250) and bars.size == (720, 320)
    assert nice_ticks(0.0, 9.7) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert nice_ticks(0.0, 0.93) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
