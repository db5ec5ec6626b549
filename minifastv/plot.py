"""Line plots drawn with pillow, so figures need no plotting library."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

# Twelve colours that stay apart (every method of the comparison gets its own), then markers repeat with them.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (0, 0, 0), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 64), (160, 160, 0)]
MARKERS = ("circle", "square", "triangle", "diamond")


def label_font(size: int = 13):
    """Pillow's own font at `size` pixels (Pillow >= 10.1), else its small bitmap font (which drops spaces)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Ticks at a round step (1, 2, 2.5 or 5 times a power of ten) from lo to hi, at most `most` of them."""
    span = hi - lo
    for step in sorted(m * 10 ** e for e in range(math.floor(math.log10(span)) - 1, math.floor(math.log10(span)) + 2)
                       for m in (1, 2, 2.5, 5)):
        first = math.ceil(lo / step - 1e-9) * step
        ticks = [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]
        if len(ticks) <= most:
            return ticks
    return [lo, hi]


def marker(pen, x, y, shape: str, colour, r: float = 4):
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "triangle":
        pen.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=colour)
    else:
        pen.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)


LEGEND_WIDTH = 160


def x_ticks(x0: float, x1: float, integer: bool) -> list[float]:
    """Round ticks (nice_ticks), or, where every x is a whole number (layers), whole numbers only, at most 11."""
    if not integer:
        return nice_ticks(x0, x1)
    step = max(1, -(-int(x1 - x0) // 10))
    return [float(x) for x in range(int(x0), int(x1) + 1, step)]


def line_plot(series: dict[str, list[tuple[float, float]]], path, *, xlabel: str, ylabel: str,
              xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
              percent_y: bool = False, size=(640, 420)):
    """One polyline with markers per named series of (x, y) points; axes, ticks, and a legend to the right of
    the plot area (so it covers no line). `size` is the plot area's; the legend widens the picture."""
    W, H = size[0] + LEGEND_WIDTH, size[1]
    left, right, top, bottom = 64, 20 + LEGEND_WIDTH, 20, 48
    points = [p for pts in series.values() for p in pts]
    x0, x1 = xlim or (min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = ylim or (min(p[1] for p in points), max(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom))

    img = Image.new("RGB", (W, H), "white")
    pen, font = ImageDraw.Draw(img), label_font()
    pen.rectangle((left, top, W - right, H - bottom), outline="black")
    for x in x_ticks(x0, x1, integer=all(float(p[0]).is_integer() for p in points)):
        px, _ = xy(x, y0)
        pen.line((px, H - bottom, px, H - bottom + 4), fill="black")
        pen.text((px, H - bottom + 6), f"{x:.2f}".rstrip("0").rstrip("."), fill="black", font=font, anchor="ma")
    for y in nice_ticks(y0, y1):
        _, py = xy(x0, y)
        pen.line((left - 4, py, left, py), fill="black")
        pen.text((left - 6, py), f"{y:.0%}" if percent_y else f"{y:.3g}", fill="black", font=font, anchor="rm")
    pen.text(((left + W - right) // 2, H - 4), xlabel, fill="black", font=font, anchor="md")
    pen.text((left + 4, 2), ylabel, fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        colour, shape = PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]
        pts = sorted(pts)
        if len(pts) > 1:
            pen.line([xy(*p) for p in pts], fill=colour, width=2)
        for p in pts:
            marker(pen, *xy(*p), shape, colour)
        lx, ly = W - LEGEND_WIDTH, top + 14 + 18 * i
        pen.line((lx, ly, lx + 22, ly), fill=colour, width=2)
        marker(pen, lx + 11, ly, shape, colour)
        pen.text((lx + 28, ly), name, fill="black", font=font, anchor="lm")
    img.save(path)
    return path
