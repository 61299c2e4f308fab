"""The benchmark's control map: a fixed line drawing (white outlines on black, like a canny map) at the
bench's size, the same for every row, so `+control` rows differ only in the weights' precision."""

from __future__ import annotations

from PIL import Image, ImageDraw


def control_map(width: int, height: int) -> Image.Image:
    """A house-like outline: a rectangle, a roof, a door and a circle, scaled to width x height."""
    image = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(image)
    w, h = width, height
    line = max(1, min(w, h) // 128)
    d.rectangle([w * 0.2, h * 0.45, w * 0.8, h * 0.9], outline="white", width=line)
    d.line([(w * 0.15, h * 0.47), (w * 0.5, h * 0.15), (w * 0.85, h * 0.47)], fill="white", width=line)
    d.rectangle([w * 0.44, h * 0.65, w * 0.56, h * 0.9], outline="white", width=line)
    d.ellipse([w * 0.68, h * 0.05, w * 0.9, h * 0.05 + w * 0.22], outline="white", width=line)
    return image
