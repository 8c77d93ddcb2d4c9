"""``report.html``: one self-contained page about a run, readable offline.

Sources, all in the run folder: ``server_state.json`` (the server's record of every round:
losses, each hospital's reported ε; how the model started; read with ``common.round_record``),
``summary.json`` when a simulation wrote one (ε recomputed from each ledger; the evaluation), ``samples/round-NNNN.png``
(sample grids), when an evaluation ran, its ``closest_pairs.png``, and when an empirical audit ran
(``medsynth audit``), its ``audit.json`` (read with ``common.audit_record``). Plots come first (losses over rounds, each
hospital's ε against its budget, sample grids over rounds, TSTR against TRTR), tables give the
exact figures. Charts are matplotlib SVGs (``common.report.plots``), pictures PNGs, all inlined as
``data:`` URIs: the page is a single file and references nothing outside itself (no script, no
style sheet, no font, no image to fetch).

It lives in ``common`` (not ``simulation``) so that the server in deployment, which ships only
``server/``, ``client/`` and ``common/``, can write the same report; it imports neither.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic import read_json_object, write_bytes_atomic
from common.audit_record import AuditReport, read_audit
from common.report.plots import SVG_MIME, bar_chart, line_chart
from common.round_record import RECORDS_FILE, RoundRecord, ServerState, read_server_state

REPORT_FILE = "report.html"
MAX_GRIDS = 8
MAX_DRAWN_HOSPITALS = 12  # above it, charts show the spread over hospitals (a legend of 100 fills the figure)
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.grids figure{display:inline-block;margin:0 12px 12px 0}.note{color:#555;font-size:90%}"""


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _training(rounds: Sequence[RoundRecord]) -> str:
    # a non-finite loss (a diverged round) has no point on the plot; the table shows "–"
    losses = {"D on generated images": [(float(r.round), r.metrics.loss_d_fake) for r in rounds
                                        if r.metrics is not None],
              "G": [(float(r.round), r.metrics.loss_g) for r in rounds if r.metrics is not None]}
    series = {name: [(x, y) for x, y in points if math.isfinite(y)] for name, points in losses.items()}
    parts = ["<h2>Training</h2>"]
    if rounds:
        parts.append(_img(line_chart(series, title="Mean local losses on generated images per round (all hospitals)",
                                     xlabel="federated round", ylabel="binary cross-entropy (nats)", integer_x=True),
                          "Per-round losses", SVG_MIME))
    parts.append(_table(
        ["round", "hospitals trained", "loss D (generated)", "loss G", "seconds", "failures"],
        [[r.round, ", ".join(r.sites_trained), None if r.metrics is None else r.metrics.loss_d_fake,
          None if r.metrics is None else r.metrics.loss_g, r.seconds, "; ".join(r.failures) or "–"] for r in rounds],
    ))
    return "".join(parts)


def _spread(per_site: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per x (round): the highest, median and lowest y over the sites that have a point there."""
    at: dict[float, list[float]] = {}
    for points in per_site.values():
        for x, y in points:
            at.setdefault(x, []).append(y)
    xs = sorted(at)
    return {name: [(x, float(pick(at[x]))) for x in xs]
            for name, pick in (("highest", max), ("median", statistics.median), ("lowest", min))}


def _privacy(rounds: Sequence[RoundRecord], sites: Mapping[str, Mapping[str, Any]],
             attempted: RoundRecord | None = None) -> str:
    """ε per round and per hospital. The table's figures come from ``summary.json`` (a simulation
    recomputes them from the ledgers) or else from each hospital's newest report in the round records
    (a deployed run; ``attempted``, a round that trained nobody, holds the newest statuses)."""
    per_round: dict[str, list[tuple[float, float]]] = {}
    budgets: dict[str, float] = {}
    latest: dict[str, dict[str, Any]] = {}
    for r in rounds:
        for site, p in sorted(r.privacy.items()):
            per_round.setdefault(site, []).append((float(r.round), p.epsilon))
            budgets[site] = p.epsilon_budget if math.isfinite(p.epsilon_budget) else math.nan  # inf: no budget
    for r in (*rounds, *(() if attempted is None else (attempted,))):
        latest.update({site: p.to_json() for site, p in r.privacy.items()})
    final = {s: dict(v) for s, v in sites.items()} or latest
    parts = ["<h2>Privacy spent per hospital</h2>",
             '<p class="note">ε per patient at the hospital\'s δ, cumulative over every step its ledger holds. '
             "Dashed: the hospital's budget; no hospital trains past it.</p>"]
    title = "Cumulative privacy loss of each hospital after each round"
    if (drawn := len(per_round)) > MAX_DRAWN_HOSPITALS:
        parts.append(f'<p class="note">{drawn} hospitals: the chart shows the highest, the median and '
                     "the lowest ε after each round; the table lists every hospital.</p>")
        per_round = _spread(per_round)
        title = f"Cumulative privacy loss after each round: highest, median and lowest of {drawn} hospitals"
    if per_round:
        hlines = {f"budget ε = {b:g}": b for b in sorted({b for b in budgets.values() if math.isfinite(b)})}
        parts.append(_img(line_chart(per_round, title=title,
                                     xlabel="federated round", ylabel="ε per patient (at the hospital's δ)",
                                     hlines=hlines, integer_x=True),
                          "Epsilon per round", SVG_MIME))
    names = sorted(final)
    if names and len(names) <= MAX_DRAWN_HOSPITALS:  # else the table alone: a bar per hospital would be unreadable
        parts.append(_img(bar_chart(
            names, {"epsilon spent": [float(final[s].get("epsilon", math.nan)) for s in names]},
            markers={"budget": [float(final[s].get("epsilon_budget", math.nan) or math.nan) for s in names]},
            title="Privacy loss spent by each hospital against its budget",
            ylabel="ε per patient (at the hospital's δ)"), "Epsilon against budget", SVG_MIME))
    if names:
        parts.append(_table(["hospital", "ε", "δ", "budget", "DP steps", "status"],
                            [[s, final[s].get("epsilon"), final[s].get("delta"), final[s].get("epsilon_budget"),
                              final[s].get("steps"), final[s].get("status", "–")] for s in names]))
    return "".join(parts)


def _grids(root: Path) -> str:
    files = sorted((root / "samples").glob("round-*.png"))
    if not files:
        return ""
    if len(files) > MAX_GRIDS:
        picks = sorted({round(i * (len(files) - 1) / (MAX_GRIDS - 1)) for i in range(MAX_GRIDS)})
        files = [files[i] for i in picks]
    figs = "".join(f"<figure>{_img(f.read_bytes(), f'Sample grid {f.stem}')}"
                   f"<figcaption>{html.escape(f.stem)}</figcaption></figure>" for f in files)
    return ('<h2>Samples over rounds</h2><p class="note">Same latent vectors every round; one row per class.</p>'
            f'<div class="grids">{figs}</div>')


def _evaluation(ev: Mapping[str, Any], closest_pairs: Path | None) -> str:
    parts = ["<h2>Evaluation against real images</h2>",
             f'<p class="note">{html.escape(str(ev.get("fd_kind", "")))}</p>']
    scores = [float(v) for k in ("tstr_auc", "trtr_auc", "tstr_acc", "trtr_acc")
              if isinstance(v := ev.get(k), int | float)]
    if len(scores) == 4:
        parts.append(_img(bar_chart(["AUC", "accuracy"], {"synthetic (TSTR)": [scores[0], scores[2]],
                                                         "real (TRTR)": [scores[1], scores[3]]},
                                    title="Classifier trained on synthetic or on real images, tested on real",
                                    ylabel="score on the real test split (0–1)"),
                          "TSTR against TRTR", SVG_MIME))
    labels = {"fd": "Fréchet distance (domain features)", "kid": "KID", "precision": "precision",
              "recall": "recall", "density": "density", "coverage": "coverage", "tstr_auc": "TSTR AUC",
              "tstr_acc": "TSTR accuracy", "trtr_auc": "TRTR AUC", "trtr_acc": "TRTR accuracy",
              "memorization_rate": "memorization rate", "nearer_train_share": "nearer to train than held-out",
              "dice_synthetic": "Dice, U-Net trained on synthetic pairs (real test, smoothed to their sharpness)",
              "dice_synthetic_unsmoothed": "Dice, the same U-Net on the real test images as they are",
              "smoothing_sigma": "smoothing of the real test images (Gaussian σ, pixels)",
              "dice_real": "Dice, U-Net trained on real pairs (real test)", "ratio": "Dice ratio synthetic / real",
              "agreement_dice": "agreement Dice (real U-Net on synthetic images vs their masks)",
              "n_synthetic": "synthetic images", "n_test": "real test images",
              "extractor_sha256": "feature extractor sha256",
              "reference": "reference", "model_sha256": "model sha256"}
    parts.append(_table(["metric", "value"], [[labels[k], ev[k]] for k in labels if k in ev]))
    real_vs_synthetic = None if closest_pairs is None else closest_pairs.parent / "real_vs_synthetic.png"
    if real_vs_synthetic is not None and real_vs_synthetic.is_file():
        parts.append("<h3>Real and synthetic images, by class</h3>"
                     '<p class="note">Real images of the reference (left) beside synthetic images of the same '
                     "class (right).</p>")
        parts.append(_img(real_vs_synthetic.read_bytes(), "Real and synthetic images"))
    if closest_pairs is not None and closest_pairs.is_file():
        parts.append("<h3>Closest synthetic–training pairs</h3>"
                     '<p class="note">The synthetic images nearest (relative to the held-out set) to a training '
                     "image. Copies would look identical to their neighbour.</p>")
        parts.append(_img(closest_pairs.read_bytes(), "Closest pairs"))
    return "".join(parts)


def _audit(report: AuditReport) -> str:
    """The "Empirical privacy" section: each attack's ε lower bound beside the ledgers' claim."""
    rows = [[f.attack, f.target, f.run, "– (no DP)" if f.claimed_epsilon is None else f.claimed_epsilon,
             f.epsilon_lower_bound, f.confidence, f.auc, f.tpr_at_1pct_fpr, f.tpr_at_01pct_fpr,
             "EXCEEDS THE CLAIM" if f.exceeds_claim else "", f.detail] for f in report.findings]
    return ("<h2>Empirical privacy</h2>"
            '<p class="note">What attacks demonstrably learned (<code>medsynth audit</code>): each is a '
            "<strong>lower bound</strong> on ε at the stated confidence, to set beside the ledgers' ε, an upper "
            "bound. A lower bound at or below the claim is consistent with it but does not prove it: a stronger "
            "attack could show more. A bound above the claim means the claim is wrong (or the run was a broken "
            "control, built to be caught).</p>"
            + _table(["attack", "target", "run", "claimed ε", "ε lower bound", "confidence", "AUC",
                      "TPR @ 1% FPR", "TPR @ 0.1% FPR", "", "detail"], rows))


def _wall_seconds(summary: Mapping[str, Any], state: ServerState | None) -> list[Any]:
    """The run's wall time: a simulation's own figure, else the sum of the rounds' (a deployed run,
    whose rounds are timed at the server; waits between rounds are not in it)."""
    if "wall_seconds" in summary:
        return ["wall seconds", summary["wall_seconds"]]
    if state is not None and state.in_process is not None:
        return ["wall seconds", state.in_process.wall_seconds]
    if state is not None and state.rounds:
        return ["wall seconds (sum of rounds)", round(sum(r.seconds for r in state.rounds), 1)]
    return ["wall seconds", "–"]


#: The privacy section of a run trained without DP (``medsynth simulate --no-dp``).
_NO_DP = ('<h2>Privacy</h2><p class="note"><strong>No differential privacy.</strong> This run trained without '
          "clipping or noise and charged no ledger (<code>medsynth simulate --no-dp</code>): a non-private "
          "reference for benchmarks. Its model and images carry no privacy guarantee; never share them.</p>")


def write_report(root: Path, *, evaluation: Mapping[str, Any] | None = None, closest_pairs: Path | None = None,
                 title: str = "medsynth run report") -> Path:
    """Write ``root/report.html`` from the run folder (and an evaluation, if given); returns its path."""
    state, summary = read_server_state(root / RECORDS_FILE), read_json_object(root / "summary.json")
    rounds = state.rounds if state is not None else ()
    stopped = state.stopped_early if state is not None else None
    run_id = state.run_id if state is not None and state.run_id is not None else "–"
    ev = evaluation if evaluation is not None else summary.get("evaluation")
    facts: list[list[Any]] = [["rounds completed", len(rounds)],
             ["model initialisation", state.initialisation.describe() if state is not None else "–"],
             ["secure aggregation", state.secure_aggregation if state is not None else "–"],
             ["stopped early", stopped.reason if stopped is not None else "no"],
             ["run id", summary.get("run_id", run_id)],
             _wall_seconds(summary, state)]
    if state is not None and state.final_model is not None:
        fm = state.final_model
        facts.append(["final model sent to", f"{', '.join(fm.kept) or 'nobody'} (round {fm.round})"])
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="note">{html.escape(str(root))} — written '
            f'{dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}</p>',
            _table(["", ""], facts), _training(rounds),
            (_privacy(rounds, summary.get("sites", {}), stopped.last_round_attempted if stopped is not None else None)
             if summary.get("differential_privacy") is not False else _NO_DP),
            _grids(root)]
    if ev:
        body.append(_evaluation(ev, closest_pairs))
    audit = read_audit(root)
    if audit is not None:
        body.append(_audit(audit))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    path = root / REPORT_FILE
    write_bytes_atomic(path, page.encode())
    return path
