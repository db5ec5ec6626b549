"""Line plots drawn with pillow, so figures need no plotting library."""

from __future__ import annotations

from PIL import Image, ImageDraw

PALETTE = [(200, 40, 40), (40, 80, 200), (230, 150, 40), (120, 120, 120), (40, 160, 80), (0, 0, 0), (150, 60, 170)]


LEGEND_WIDTH = 160


def x_ticks(x0: float, x1: float, integer: bool) -> list[float]:
    """Five even ticks, or, where every x is a whole number (layers), whole numbers only, at most 11 of them."""
    if not integer:
        return [x0 + (x1 - x0) * i / 4 for i in range(5)]
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
    pen = ImageDraw.Draw(img)
    pen.rectangle((left, top, W - right, H - bottom), outline="black")
    for x in x_ticks(x0, x1, integer=all(float(p[0]).is_integer() for p in points)):
        px, _ = xy(x, y0)
        pen.line((px, H - bottom, px, H - bottom + 4), fill="black")
        pen.text((px - 12, H - bottom + 6), f"{x:.2f}".rstrip("0").rstrip("."), fill="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = xy(x0, y)
        pen.line((left - 4, py, left, py), fill="black")
        pen.text((6, py - 6), f"{y:.0%}" if percent_y else f"{y:.3g}", fill="black")
    pen.text((W // 2 - 4 * len(xlabel), H - 18), xlabel, fill="black")
    pen.text((left + 4, 2), ylabel, fill="black")
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        if len(pts) > 1:
            pen.line([xy(*p) for p in pts], fill=colour, width=2)
        for p in pts:
            cx, cy = xy(*p)
            pen.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        lx = W - LEGEND_WIDTH
        pen.rectangle((lx, top + 8 + 14 * i, lx + 10, top + 18 + 14 * i), fill=colour)
        pen.text((lx + 16, top + 7 + 14 * i), name, fill="black")
    img.save(path)
    return path
