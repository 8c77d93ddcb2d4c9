"""The report's charts, drawn with matplotlib, and its image tables, pasted with Pillow.

Charts (:func:`line_chart`, :func:`bar_chart`) are matplotlib figures saved as SVG: vector
graphics stay sharp at any zoom and when printed, like a paper's figure, and every glyph is
written as a path (matplotlib's default ``svg.fonttype``), so the picture needs no font and no
file besides itself. ``report.html`` inlines them as ``data:`` URIs; a browser never lets an
SVG loaded as an image fetch anything, so the page stays one offline file. Figures are built
with matplotlib's object interface (``Figure``, no ``pyplot``): no GUI backend, no global
figure registry, nothing shared between threads; the drawing is matplotlib's own renderer for
the format asked (SVG here; Agg for PNG). Output is deterministic (fixed SVG id salt, no date),
so two reports of one run are byte-identical.

:func:`image_table` stays on Pillow: it pastes small greyscale images side by side at an
integer nearest-neighbour scale, with no axes, which is what Pillow does and a plotting
library would only resample.

matplotlib is imported inside the functions: the report is written by the server and by the
evaluation, and no ``medsynth`` command should pay for the import at start-up. Colours are the
Okabe–Ito palette (readable with the common colour-vision deficiencies).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
DPI = 96  # CSS pixels per inch: a figure asked for W × H pixels shows at W × H CSS pixels
SVG_MIME = "image/svg+xml"
_TEXT = "#222222"
_STYLE: dict[RcKeyType, Any] = {
    "svg.hashsalt": "medsynth-report",  # ids of clip paths etc. from this salt, not at random
    "svg.fonttype": "path",  # glyphs as paths: no font needed to view the file
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.8,
    "legend.frameon": False,
    "legend.fontsize": 9,
}
Point = tuple[float, float]


def _figure(width: int, height: int) -> tuple[Figure, Axes]:
    """A figure of ``width`` × ``height`` CSS pixels with one axes; layout fitted at save time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def svg_bytes(fig: Figure) -> bytes:
    """The figure as SVG, deterministic (no date in the metadata, fixed id salt)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _round_y(ax: Axes, low: float, high: float) -> None:
    """y axis from ``low`` to ``high`` widened to round ticks (1, 2 or 5 × 10^k apart, about 6 of them)."""
    from matplotlib.ticker import MaxNLocator

    if high <= low:
        high = low + (abs(low) or 1.0)
    ticks = np.asarray(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]).tick_values(low, high), dtype=np.float64)
    ticks = ticks[(ticks >= ticks[ticks <= low].max()) & (ticks <= ticks[ticks >= high].min())]
    ax.set_yticks(ticks)
    ax.set_ylim(float(ticks[0]), float(ticks[-1]))


def _legend(ax: Axes) -> None:
    """Legend right of the plot area, so it never hides a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def line_figure(series: Mapping[str, Sequence[Point]], *, title: str, xlabel: str, ylabel: str,
                hlines: Mapping[str, float] | None = None, width: int = 720, height: int = 320,
                integer_x: bool = False) -> Figure:
    """One line with point markers per series; ``hlines`` are dashed horizontal references (budgets).

    Non-finite y values are left out (a diverged round has no point). ``integer_x``: x ticks at
    whole numbers only (rounds). The y axis spans 0 and every value, widened to round ticks.
    """
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure(width, height)
        for i, (name, pts) in enumerate(series.items()):
            finite = [(x, y) for x, y in pts if math.isfinite(y)]
            xs, ys = [x for x, _ in finite], [y for _, y in finite]
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.8, color=PALETTE[i % len(PALETTE)], label=name)
        for j, (name, value) in enumerate((hlines or {}).items()):
            ax.axhline(value, linestyle="--", linewidth=1.5, color=PALETTE[(len(series) + j) % len(PALETTE)],
                       label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=integer_x))
        values = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
        values += [v * 1.04 for v in (hlines or {}).values() if math.isfinite(v)]  # a budget line clear of the frame
        _round_y(ax, min([0.0, *values]), max([0.0, *values]))
        _legend(ax)
    return fig


def line_chart(series: Mapping[str, Sequence[Point]], *, title: str, xlabel: str, ylabel: str,
               hlines: Mapping[str, float] | None = None, width: int = 720, height: int = 320,
               integer_x: bool = False) -> bytes:
    """:func:`line_figure` as SVG bytes."""
    return svg_bytes(line_figure(series, title=title, xlabel=xlabel, ylabel=ylabel, hlines=hlines, width=width,
                                 height=height, integer_x=integer_x))


def bar_figure(groups: Sequence[str], bars: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
               markers: Mapping[str, Sequence[float]] | None = None, width: int = 720, height: int = 320) -> Figure:
    """Grouped bars (one colour per series, each labelled with its value); ``markers`` draw a dashed
    line across each group (e.g. a budget). Non-finite values draw nothing."""
    import matplotlib

    markers = dict(markers or {})
    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure(width, height)
        x = np.arange(len(groups), dtype=np.float64)
        bar_w = 0.7 / max(len(bars), 1)
        for i, (name, values) in enumerate(bars.items()):
            heights = np.array([v if math.isfinite(v) else 0.0 for v in values], dtype=np.float64)
            drawn = ax.bar(x - 0.35 + bar_w * (i + 0.5), heights, bar_w * 0.92, color=PALETTE[i % len(PALETTE)],
                           label=name)
            ax.bar_label(drawn, labels=[f"{v:.3g}" if math.isfinite(v) else "" for v in values], padding=2,
                         fontsize=8, color=_TEXT)
        for j, (name, values) in enumerate(markers.items()):
            colour = PALETTE[(len(bars) + j) % len(PALETTE)]
            finite = [(g, v) for g, v in enumerate(values) if math.isfinite(v)]
            if finite:
                ax.hlines([v for _, v in finite], [g - 0.42 for g, _ in finite], [g + 0.42 for g, _ in finite],
                          colors=colour, linestyles="--", linewidth=2.0, label=name)
        ax.set_xticks(x, list(groups))
        ax.grid(axis="x", visible=False)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        values = [v for vs in (*bars.values(), *markers.values()) for v in vs if math.isfinite(v)]
        _round_y(ax, min([0.0, *values]), max([0.0, *values]) * 1.1)  # room for the value labels
        _legend(ax)
    return fig


def bar_chart(groups: Sequence[str], bars: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
              markers: Mapping[str, Sequence[float]] | None = None, width: int = 720, height: int = 320) -> bytes:
    """:func:`bar_figure` as SVG bytes."""
    return svg_bytes(bar_figure(groups, bars, title=title, ylabel=ylabel, markers=markers, width=width,
                                height=height))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_table(rows: Sequence[Sequence[np.ndarray]], *, columns: Sequence[str], captions: Sequence[str],
                scale: int = 3) -> bytes:
    """A PNG grid of uint8 greyscale images: one row per entry, titled columns, a caption per row."""
    if not rows:
        raise ValueError("image_table needs at least one row")
    side = max(max(img.shape) for row in rows for img in row) * scale
    pad, head, cap_w = 8, 22, 230
    width = pad + len(columns) * (side + pad) + cap_w
    height = head + len(rows) * (side + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    for c, name in enumerate(columns):
        draw.text((pad + c * (side + pad) + side // 2, 4), name, fill=_TEXT, font=font, anchor="ma")
    for r, row in enumerate(rows):
        y = head + r * (side + pad)
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST)
            canvas.paste(tile.convert("RGB"), (pad + c * (side + pad), y))
        draw.text((pad + len(columns) * (side + pad), y + side // 2), captions[r], fill=_TEXT, font=font,
                  anchor="lm")
    return png_bytes(canvas)
