"""The two pictures of a report, drawn with PIL only: the image grid and the quality-vs-time scatter plot.

Labels use PIL's bundled font, which has Latin glyphs only: grid columns are labelled with the ASCII
prompt ids, never the prompt text.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

BG, FG, GRID_LINE, ACCENT = (255, 255, 255), (20, 20, 20), (225, 225, 225), (200, 40, 40)
OTHER = (40, 90, 200)
MAX_COLUMNS = 8


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, fnt) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return right - left


def grid(rows: list[tuple[str, list[Image.Image]]], columns: list[str]) -> Image.Image:
    """Rows of thumbnails (one per (prompt, seed), same order as `columns`), labelled on the left and top.

    A row label may hold several lines ("q4_k\nPSNR 31.2 dB").
    """
    columns = columns[:MAX_COLUMNS]
    fnt, head_fnt, pad, head_h = font(14), font(12), 6, 24
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_h = max((t.size[1] for _, thumbs in rows for t in thumbs), default=64)
    col_w = max(
        [t.size[0] for _, thumbs in rows for t in thumbs]
        + [_text_width(probe, c, head_fnt) for c in columns]
        + [64]
    )
    label_w = (
        max([_text_width(probe, line, fnt) for name, _ in rows for line in name.split("\n")] + [60]) + 2 * pad
    )
    width = label_w + len(columns) * (col_w + pad) + pad
    height = head_h + len(rows) * (tile_h + pad) + pad
    img = Image.new("RGB", (max(width, 200), max(height, 60)), BG)
    d = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        d.text((label_w + j * (col_w + pad), 4), name, fill=FG, font=head_fnt)
    for i, (name, thumbs) in enumerate(rows):
        y = head_h + i * (tile_h + pad)
        lines = name.split("\n")
        for k, line in enumerate(lines):
            d.text((pad, y + tile_h // 2 - 9 * len(lines) + 18 * k), line, fill=FG, font=fnt)
        for j, thumb in enumerate(thumbs[: len(columns)]):
            img.paste(thumb.convert("RGB"), (label_w + j * (col_w + pad), y))
    if not rows:
        d.text((pad, head_h), "no rows completed", fill=ACCENT, font=fnt)
    return img


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _points(rows: list[dict]) -> list[tuple[str, float, float, str]]:
    """(label, s/image, PSNR, kind) for completed rows that have both; PSNR may be inf (the reference)."""
    pts = []
    for r in rows:
        t, q = r["timing"]["s_per_image_median"], r["quality"]["psnr_db_mean"]
        if r["status"] == "ok" and t is not None and q is not None:
            pts.append((r["name"], float(t), float(q), r["kind"]))
    return pts


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(d: ImageDraw.ImageDraw, x: float, y: float, text: str, fnt, taken: list[tuple]) -> None:
    """Draw text beside (x, y) where it hides no earlier label (first free of a few spots)."""
    w = _text_width(d, text, fnt)
    spots = [(8, -8), (8, 6), (8, -22), (-w - 8, -8), (-w - 8, 6), (8, 20), (-w - 8, -22), (8, -36)]
    for dx, dy in spots:
        box = (x + dx, y + dy, x + dx + w, y + dy + 14)
        if not any(_overlaps(box, other) for other in taken):
            break
    taken.append(box)
    d.text((box[0], box[1]), text, fill=FG, font=fnt)


def quality_time_plot(rows: list[dict], size: tuple[int, int] = (900, 560)) -> Image.Image:
    """Mean PSNR against median seconds per image, one labelled point per row. inf sits on a top band."""
    w, h = size
    left, right, top, bottom = 80, 30, 60, 60
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    d.text((left - 40, 12), "quality vs time: PSNR vs the reference image (up and left is better)",
           fill=FG, font=font(15))  # fmt: skip
    pts = _points(rows)
    finite = [p for _, _, p, _ in pts if math.isfinite(p)]
    y_lo, y_hi = (min(finite) - 2, max(finite) + 2) if finite else (0.0, 50.0)
    times = [t for _, t, _, _ in pts] or [1.0]
    span = max(max(times) - min(times), 0.05 * max(times), 1e-6)
    x_lo, x_hi = max(0.0, min(times) - 0.25 * span), max(times) + 0.35 * span  # room for labels
    band = 28  # pixels above the finite range where PSNR = inf points sit
    plot_top = top + band

    def x_of(t: float) -> float:
        return left + (w - left - right) * (t - x_lo) / (x_hi - x_lo)

    def y_of(p: float) -> float:
        if math.isinf(p):
            return top + band / 2
        return plot_top + (h - bottom - plot_top) * (1 - (p - y_lo) / max(y_hi - y_lo, 1e-9))

    small = font(12)
    for t in _nice_ticks(x_lo, x_hi):
        x = x_of(t)
        d.line([(x, plot_top), (x, h - bottom)], fill=GRID_LINE)
        d.text((x - 10, h - bottom + 6), f"{t:g}", fill=FG, font=small)
    for p in _nice_ticks(y_lo, y_hi):
        y = y_of(p)
        d.line([(left, y), (w - right, y)], fill=GRID_LINE)
        d.text((left - 45, y - 7), f"{p:g}", fill=FG, font=small)
    d.line([(left, plot_top), (left, h - bottom), (w - right, h - bottom)], fill=FG, width=2)
    d.line([(left, top + band / 2), (w - right, top + band / 2)], fill=GRID_LINE)
    d.text((left - 45, top + band / 2 - 7), "inf", fill=FG, font=small)
    d.text(((w - 220) / 2, h - 28), "median seconds per image", fill=FG, font=font(14))
    d.text((8, top - 24), "PSNR (dB)", fill=FG, font=font(14))
    taken: list[tuple] = []
    for _name, t, p, kind in sorted(pts, key=lambda q: q[1]):
        x, y = x_of(t), y_of(p)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=ACCENT if kind == "zimage-lite" else OTHER)
        taken.append((x - 5, y - 5, x + 5, y + 5))
    for name, t, p, _ in sorted(pts, key=lambda q: q[1]):
        _place_label(d, x_of(t), y_of(p), name, small, taken)
    kinds = {kind for _, _, _, kind in pts}  # a legend entry only for the kinds of rows drawn
    legend = [
        (k, ACCENT if k == "zimage-lite" else OTHER) for k in ("zimage-lite", "diffusers") if k in kinds
    ]
    for i, (kind, colour) in enumerate(legend):
        x = w - 250 + 100 * i
        d.ellipse([x, 18, x + 8, 26], fill=colour)
        d.text((x + 14, 14), kind, fill=FG, font=small)
    if not pts:
        d.text((left + 20, plot_top + 20), "no completed rows", fill=ACCENT, font=font(14))
    return img
