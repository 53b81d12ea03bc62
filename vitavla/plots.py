"""Line charts drawn with PIL alone (no plotting library in the dependencies): learning curves for reports.

Each series is a list of ``(x, mean, lo, hi)`` points: a line through the means with a vertical bar from
``lo`` to ``hi`` at every point (e.g. the range over seeds). Colours are fixed per series index, so a chart
can be checked pixel by pixel.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

SERIES_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
PANEL_W, PANEL_H, PAD_L, PAD_R, PAD_T, PAD_B = 480, 320, 60, 16, 36, 44

Point = tuple[float, float, float, float]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _range(values: list[float], floor_zero: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor_zero:
        lo = min(lo, 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    return lo, hi


def line_panel(series: dict[str, list[Point]], title: str, ylabel: str, xlabel: str = "training step",
               y_range: tuple[float, float] | None = None) -> Image.Image:
    """One panel: axes with min/max ticks, a legend, and every series as a line with range bars."""
    img = Image.new("RGB", (PANEL_W, PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    points = [p for pts in series.values() for p in pts if all(math.isfinite(v) for v in p)]
    x0, x1, y0, y1 = PAD_L, PANEL_W - PAD_R, PANEL_H - PAD_B, PAD_T
    draw.text((PAD_L, 8), title, fill=(0, 0, 0), font=_font(13))
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=(0, 0, 0))
    draw.text((x0, PANEL_H - 18), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, y1 - 20), ylabel, fill=(0, 0, 0), font=font)
    if not points:
        draw.text((x0 + 20, (y0 + y1) // 2), "no data", fill=(0, 0, 0), font=font)
        return img
    xmin, xmax = _range([p[0] for p in points], floor_zero=False)
    ymin, ymax = y_range or _range([v for p in points for v in p[1:]], floor_zero=True)

    def px(x: float, y: float) -> tuple[int, int]:
        return (round(x0 + 8 + (x - xmin) / (xmax - xmin) * (x1 - x0 - 16)),
                round(y0 - (y - ymin) / (ymax - ymin) * (y0 - y1)))

    for y in (ymin, ymax):
        draw.text((6, px(xmin, y)[1] - 6), f"{y:.3g}", fill=(0, 0, 0), font=font)
    for x in sorted({p[0] for p in points}):
        draw.text((px(x, ymin)[0] - 8, y0 + 4), f"{x:g}", fill=(0, 0, 0), font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        pts = sorted(p for p in pts if all(math.isfinite(v) for v in p))
        for x, _, lo, hi in pts:
            (bx, by_lo), (_, by_hi) = px(x, lo), px(x, hi)
            draw.line([(bx, by_lo), (bx, by_hi)], fill=color, width=1)
        if len(pts) > 1:
            draw.line([px(x, m) for x, m, _, _ in pts], fill=color, width=2)
        for x, m, _, _ in pts:
            cx, cy = px(x, m)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        draw.rectangle([x1 - 150, y1 + 4 + 16 * i, x1 - 140, y1 + 14 + 16 * i], fill=color)
        draw.text((x1 - 134, y1 + 2 + 16 * i), name, fill=(0, 0, 0), font=font)
    return img


def side_by_side(panels: list[Image.Image]) -> Image.Image:
    """Panels in one row, for a single PNG."""
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    return out
