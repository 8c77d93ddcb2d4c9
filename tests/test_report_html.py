"""``report.html`` from a run folder: one offline file with the plots first and the exact figures in tables."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.audit_record import AuditFinding, AuditReport, write_audit
from common.report.html import _spread, write_report
from common.report.plots import DPI, bar_chart, image_table, line_chart, line_figure
from common.report.samples import save_png

SVG = "{http://www.w3.org/2000/svg}svg"


def _run_folder(root: Path, rounds: int = 3, num_sites: int = 3) -> Path:
    """server_state.json, summary.json and sample grids as a simulation of ``num_sites`` leaves them."""
    records = []
    for r in range(1, rounds + 1):
        privacy = {f"site-{s}": {"status": "ok", "epsilon": 2.5 * r + s, "epsilon_budget": 10.0, "delta": 1e-5,
                                 "steps": 20 * r} for s in range(num_sites)}
        records.append({"round": r, "sites_trained": sorted(privacy), "sites_budget_exhausted": [],
                        "loss_d_fake": 1.5 - 0.1 * r, "loss_g": 0.7 + 0.2 * r, "privacy": privacy, "failures": [],
                        "seconds": 12.5})
    (root / "server_state.json").write_text(json.dumps({"rounds": records, "finished": True,
                                                        "secure_aggregation": True}))
    sites = {f"site-{s}": {"epsilon": 7.5 + s, "delta": 1e-5, "epsilon_budget": 10.0, "steps": 60, "status": "ok"}
             for s in range(num_sites)}
    (root / "summary.json").write_text(json.dumps({"run_id": 42, "sites": sites, "wall_seconds": 99.0}))
    for r in range(1, rounds + 1):
        save_png(np.full((20, 40), 40 * r, np.uint8), root / "samples" / f"round-{r:04d}.png")
    return root


def _images(page: str) -> dict[str, Image.Image | ET.Element]:
    """alt text → decoded PNG (Pillow image) or SVG (its root element) of every inlined image."""
    found = re.findall(r'<img alt="([^"]+)" src="data:(image/png|image/svg\+xml);base64,([^"]+)">', page)
    return {alt: Image.open(io.BytesIO(base64.b64decode(data))) if mime == "image/png"
            else ET.fromstring(base64.b64decode(data)) for alt, mime, data in found}


def _svg_size(svg: bytes | ET.Element) -> tuple[int, int]:
    """(width, height) in CSS pixels of an SVG matplotlib wrote (sizes in pt, 72 per inch)."""
    root = ET.fromstring(svg) if isinstance(svg, bytes) else svg
    assert root.tag == SVG
    return (round(float(root.attrib["width"].removesuffix("pt")) * DPI / 72),
            round(float(root.attrib["height"].removesuffix("pt")) * DPI / 72))


def _width(image: Image.Image | ET.Element) -> int:
    return image.size[0] if isinstance(image, Image.Image) else _svg_size(image)[0]


def test_report_holds_loss_epsilon_and_sample_plots_and_tables(tmp_path: Path) -> None:
    # prepare
    run = _run_folder(tmp_path)
    # act
    path = write_report(run)
    page = path.read_text()
    images = _images(page)
    # assert: charts are SVG documents, sample grids PNGs, all inlined (no external reference)
    assert path == run / "report.html"
    charts = {"Per-round losses", "Epsilon per round", "Epsilon against budget"}
    assert charts <= set(images) and all(isinstance(images[c], ET.Element) for c in charts)
    assert {f"Sample grid round-000{r}" for r in (1, 2, 3)} <= set(images)
    assert all(isinstance(img := images[f"Sample grid round-000{r}"], Image.Image) and img.format == "PNG"
               for r in (1, 2, 3))
    assert all(_width(img) >= 40 for img in images.values())
    assert "http" not in page and "<script" not in page
    # tables: exact figures; ε from summary.json (ledger-recomputed) in the per-site table
    assert "<td>site-2</td><td>9.5</td><td>1e-05</td><td>10</td><td>60</td><td>ok</td>" in page
    assert "<td>3</td><td>site-0, site-1, site-2</td><td>1.2</td><td>1.3</td><td>12.5</td>" in page
    assert "Evaluation" not in page  # no reference given


def test_with_many_hospitals_the_charts_show_their_spread_and_the_table_every_one(tmp_path: Path) -> None:
    # prepare: 100 hospitals (a legend of 100 names would squeeze the plot to nothing)
    run = _run_folder(tmp_path, num_sites=100)
    # act: any warning (matplotlib's "constrained_layout not applied") fails the test
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = write_report(run).read_text()
    # assert: ε per round as highest, median and lowest (round 3: 7.5 + 99, median 7.5 + 49.5, 7.5),
    # no bar per hospital, and every hospital in the table
    images = _images(page)
    assert "Epsilon per round" in images and "Epsilon against budget" not in images
    assert "100 hospitals: the chart shows the highest, the median and the lowest ε" in page
    assert all(f"<td>site-{s}</td>" in page for s in range(100))
    spread = _spread({f"site-{s}": [(1.0, 2.5 + s), (2.0, 5.0 + s)] for s in range(100)})
    assert spread == {"highest": [(1.0, 101.5), (2.0, 104.0)], "median": [(1.0, 52.0), (2.0, 54.5)],
                      "lowest": [(1.0, 2.5), (2.0, 5.0)]}


def test_a_deployed_run_fills_the_privacy_table_and_wall_time_from_the_round_records(tmp_path: Path) -> None:
    # prepare: a deployed run writes no summary.json, only the server's round records
    run = _run_folder(tmp_path)
    (run / "summary.json").unlink()
    # act
    page = write_report(run).read_text()
    # assert: each hospital's newest report (round 3: ε = 7.5 + s, 60 steps), δ, steps and status filled
    for s in range(3):
        assert f"<td>site-{s}</td><td>{7.5 + s:g}</td><td>1e-05</td><td>10</td><td>60</td><td>ok</td>" in page
    assert "<td>wall seconds (sum of rounds)</td><td>37.5</td>" in page


def test_report_includes_the_evaluation_when_given(tmp_path: Path) -> None:
    # prepare
    run = _run_folder(tmp_path)
    evaluation = {"fd": 12.5, "kid": 0.0123, "tstr_auc": 0.81, "tstr_acc": 0.75, "trtr_auc": 0.95,
                  "trtr_acc": 0.86, "memorization_rate": 0.0, "fd_kind": "domain FD, not Inception FID"}
    pairs = tmp_path / "pairs.png"
    pairs.write_bytes(image_table([[np.zeros((4, 4), np.uint8)]], columns=["synthetic"], captions=["d 0"]))
    # act
    page = write_report(run, evaluation=evaluation, closest_pairs=pairs).read_text()
    # assert
    assert {"TSTR against TRTR", "Closest pairs"} <= set(_images(page))
    assert "<td>TSTR AUC</td><td>0.81</td>" in page and "<td>memorization rate</td><td>0</td>" in page
    assert "not Inception FID" in page


def test_report_shows_the_empirical_privacy_section_when_an_audit_ran(tmp_path: Path) -> None:
    # prepare
    run = _run_folder(tmp_path)
    assert "Empirical privacy" not in write_report(run).read_text()  # no audit.json, no section
    findings = (AuditFinding(attack="one-run", target="DP-SGD updates", run="ε = 1, seed 0", claimed_epsilon=1.0,
                             epsilon_lower_bound=0.21, confidence=0.95, auc=None, tpr_at_1pct_fpr=None,
                             tpr_at_01pct_fpr=None, detail="2000 canaries"),
                AuditFinding(attack="one-run", target="DP-SGD updates", run="broken", claimed_epsilon=1.0,
                             epsilon_lower_bound=3.7, confidence=0.95, auc=None, tpr_at_1pct_fpr=None,
                             tpr_at_01pct_fpr=None, detail="broken control"))
    write_audit(run, AuditReport(findings))
    # act
    page = write_report(run).read_text()
    # assert
    assert "<h2>Empirical privacy</h2>" in page and "lower bound" in page and "does not prove it" in page
    assert "<td>ε = 1, seed 0</td><td>1</td><td>0.21</td><td>0.95</td>" in page
    assert page.count("EXCEEDS THE CLAIM") == 1  # the broken control's row only


def _y_ticks(top: float) -> list[float]:
    """The y ticks of a line figure whose values span 0 to ``top``."""
    ax = line_figure({"a": [(1.0, 0.0), (2.0, top)]}, title="t", xlabel="x", ylabel="y").axes[0]
    return [float(t) for t in ax.get_yticks()]


def test_charts_are_svgs_of_the_asked_size_and_ticks_are_round() -> None:
    # act
    line = line_chart({"a": [(1.0, 0.5), (2.0, 0.7)]}, title="t", xlabel="x", ylabel="y", hlines={"budget": 1.0},
                      width=500, height=250)
    bars = bar_chart(["s0", "s1"], {"spent": [1.0, 2.0]}, markers={"budget": [3.0, 3.0]}, title="t", ylabel="ε")
    # assert
    assert _svg_size(line) == (500, 250) and _svg_size(bars) == (720, 320)
    assert _y_ticks(9.7) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert _y_ticks(0.93) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


class _Resources(HTMLParser):
    """Every attribute through which a page loads something (src, href, srcset, poster, data, action)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if v is not None and k in ("src", "href", "srcset", "poster", "data",
                                                                        "action")]


def test_the_report_fetches_nothing_from_the_network(tmp_path: Path) -> None:
    # prepare: a report with every section, charts included
    run = _run_folder(tmp_path)
    evaluation = {"fd": 12.5, "tstr_auc": 0.81, "tstr_acc": 0.75, "trtr_auc": 0.95, "trtr_acc": 0.86}
    # act
    page = write_report(run, evaluation=evaluation).read_text()
    resources = _Resources()
    resources.feed(page)
    svgs = [base64.b64decode(d) for d in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)]
    # assert: every resource (4 charts, 3 sample grids) is inline data; no script, style sheet, CSS
    # import or font to fetch
    assert len(resources.urls) == 7 and all(u.startswith("data:image/") for u in resources.urls)
    assert not re.search(r"(?i)<script|<link|@import|url\(|@font-face", page)
    # the four charts (SVG documents) link only to their own elements and embed no image or font
    assert len(svgs) == 4
    for svg in svgs:
        assert all(h.startswith(b"#") for h in re.findall(rb'href="([^"]*)"', svg))
        assert not re.search(rb"<image|@font-face|url\(http", svg)


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    # prepare
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium): report.html not checked "
                    "in a browser")
    (tmp_path / "run").mkdir()
    run = _run_folder(tmp_path / "run")
    page = write_report(run, evaluation={"fd": 12.5, "tstr_auc": 0.81, "tstr_acc": 0.75, "trtr_auc": 0.95,
                                         "trtr_acc": 0.86})
    shot = tmp_path / "shot.png"
    # act: no network for the browser either (an unreachable proxy), so a fetch could not succeed
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'profile'}",
                           "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=180, check=False)
    # assert: a screenshot that is not blank: a white page with dark text, coloured lines and bars
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    dark = (pixels.sum(axis=2) < 200).mean()
    coloured = (np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 60).mean()
    assert pixels.shape[:2] == (2400, 1200)
    assert dark > 0.002 and coloured > 0.002, (dark, coloured)
