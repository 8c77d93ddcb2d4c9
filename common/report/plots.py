"""Small charts drawn with Pillow (no plotting library is installed): line charts, bar charts, image tables.

Every function returns PNG bytes, ready to embed in an HTML page as a ``data:`` URI, so a report
is one self-contained file that opens offline. Colours are the Okabe–Ito palette (readable
with the common colour-vision deficiencies).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_GRID, _AXIS, _TEXT = "#DDDDDD", "#444444", "#222222"
Point = tuple[float, float]


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [low, high], as close to ``count`` as possible."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))

    def intervals(step: float) -> int:
        return math.ceil(high / step - 1e-9) - math.floor(low / step + 1e-9)

    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda s: (abs(intervals(s) - (count - 1)), -s))
    start = math.floor(low / step + 1e-9) * step
    ticks, t = [], start
    while t <= high + step * 0.5:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


class _Frame:
    """Plot area with axes, grid, ticks, title and axis labels; maps data to pixels."""

    def __init__(self, width: int, height: int, title: str, xlabel: str, ylabel: str,
                 xticks: list[float], yticks: list[float], *, label_x: bool = True) -> None:
        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.right, self.top, self.bottom = 64, width - 150, 34, height - 44
        self.x0, self.x1, self.y0, self.y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
        d, font = self.draw, _font()
        d.text((width // 2, 6), title, fill=_TEXT, font=_font(14), anchor="ma")
        for y in yticks:
            py = self.py(y)
            d.line([(self.left, py), (self.right, py)], fill=_GRID)
            d.text((self.left - 6, py), _fmt(y), fill=_TEXT, font=font, anchor="rm")
        for x in xticks if label_x else []:
            px = self.px(x)
            d.line([(px, self.bottom), (px, self.bottom + 4)], fill=_AXIS)
            d.text((px, self.bottom + 6), _fmt(x), fill=_TEXT, font=font, anchor="ma")
        d.rectangle([self.left, self.top, self.right, self.bottom], outline=_AXIS)
        d.text(((self.left + self.right) // 2, height - 16), xlabel, fill=_TEXT, font=font, anchor="ma")
        d.text((6, self.top - 18), ylabel, fill=_TEXT, font=font)

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1.0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / ((self.y1 - self.y0) or 1.0) * (self.bottom - self.top)

    def legend(self, entries: Sequence[tuple[str, str, bool]]) -> None:
        """(label, colour, dashed) per entry, right of the plot area."""
        font = _font()
        for i, (label, colour, dashed) in enumerate(entries):
            y = self.top + 8 + 18 * i
            x = self.right + 12
            if dashed:
                for s in range(0, 22, 6):
                    self.draw.line([(x + s, y), (x + s + 3, y)], fill=colour, width=2)
            else:
                self.draw.line([(x, y), (x + 22, y)], fill=colour, width=3)
            self.draw.text((x + 28, y), label[:20], fill=_TEXT, font=font, anchor="lm")


def line_chart(series: Mapping[str, Sequence[Point]], *, title: str, xlabel: str, ylabel: str,
               hlines: Mapping[str, float] | None = None, width: int = 720, height: int = 320,
               integer_x: bool = False) -> bytes:
    """One line with point markers per series; ``hlines`` are dashed horizontal references (budgets).

    ``integer_x``: x ticks at whole numbers only (rounds). Labels are drawn with Pillow's built-in
    font, which has Latin glyphs only: write "epsilon", not the Greek letter.
    """
    hlines = dict(hlines or {})
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts if math.isfinite(y)] + list(hlines.values())
    ys = ys or [0.0, 1.0]
    xticks = nice_ticks(min(xs), max(xs), 6)
    if integer_x:
        xticks = nice_ticks(min(xs), max(max(xs), min(xs) + 1), min(6, int(max(xs) - min(xs)) + 1))
        xticks = [t for t in xticks if float(t).is_integer()] or [min(xs), max(xs)]
    frame = _Frame(width, height, title, xlabel, ylabel, xticks, nice_ticks(min(0.0, min(ys)), max(ys)))
    entries: list[tuple[str, str, bool]] = []
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = [(frame.px(x), frame.py(y)) for x, y in pts if math.isfinite(y)]
        if len(coords) > 1:
            frame.draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            frame.draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        entries.append((name, colour, False))
    for j, (name, value) in enumerate(hlines.items()):
        colour = PALETTE[(len(series) + j) % len(PALETTE)]
        y = frame.py(value)
        for s in range(frame.left, frame.right, 10):
            frame.draw.line([(s, y), (min(s + 5, frame.right), y)], fill=colour, width=2)
        entries.append((name, colour, True))
    frame.legend(entries)
    return png_bytes(frame.image)


def bar_chart(groups: Sequence[str], bars: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
              markers: Mapping[str, Sequence[float]] | None = None, width: int = 720, height: int = 320) -> bytes:
    """Grouped bars (one colour per series); ``markers`` draw a dashed tick per group (e.g. a budget)."""
    markers = dict(markers or {})
    values = [v for vs in (*bars.values(), *markers.values()) for v in vs if math.isfinite(v)] or [1.0]
    frame = _Frame(width, height, title, "", ylabel, [0.0, float(len(groups))],
                   nice_ticks(min(0.0, min(values)), max(values) * 1.12), label_x=False)  # room for labels
    slot = (frame.right - frame.left) / max(len(groups), 1)
    bar_w = slot * 0.7 / max(len(bars), 1)
    font = _font()
    entries: list[tuple[str, str, bool]] = []
    for g, group in enumerate(groups):
        base = frame.left + g * slot + slot * 0.15
        frame.draw.text((base + slot * 0.35, frame.bottom + 6), group[:16], fill=_TEXT, font=font, anchor="ma")
        for i, vs in enumerate(bars.values()):
            v = vs[g]
            if math.isfinite(v):
                x = base + i * bar_w
                frame.draw.rectangle([x, frame.py(max(v, 0.0)), x + bar_w - 2, frame.py(0.0)],
                                     fill=PALETTE[i % len(PALETTE)])
                frame.draw.text((x + bar_w / 2, frame.py(max(v, 0.0)) - 2), _fmt(v), fill=_TEXT,
                                font=font, anchor="md")
        for j, ms in enumerate(markers.values()):
            y = frame.py(ms[g])
            colour = PALETTE[(len(bars) + j) % len(PALETTE)]
            for s in np.arange(base - 4, base + slot * 0.7 + 4, 8):
                frame.draw.line([(s, y), (s + 4, y)], fill=colour, width=3)
    entries += [(n, PALETTE[i % len(PALETTE)], False) for i, n in enumerate(bars)]
    entries += [(n, PALETTE[(len(bars) + j) % len(PALETTE)], True) for j, n in enumerate(markers)]
    frame.legend(entries)
    return png_bytes(frame.image)


def image_table(rows: Sequence[Sequence[np.ndarray]], *, columns: Sequence[str], captions: Sequence[str],
                scale: int = 3) -> bytes:
    """A grid of uint8 greyscale images: one row per entry, titled columns, a caption per row."""
    if not rows:
        raise ValueError("image_table needs at least one row")
    side = max(max(img.shape) for row in rows for img in row) * scale
    pad, head, cap_w = 8, 22, 230
    width = pad + len(columns) * (side + pad) + cap_w
    height = head + len(rows) * (side + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
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
