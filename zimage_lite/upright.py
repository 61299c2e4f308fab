"""Images as they are shown: the EXIF Orientation tag applied, as diffusers' `load_image` does
(`PIL.ImageOps.exif_transpose`). A phone stores a portrait photo's pixels sideways and sets the tag; read
without it, an init image, mask or control map would be turned against the picture the user sees.
One helper for every place that reads a user's image (generate's files, the server's uploads)."""

from __future__ import annotations

from PIL import Image, ImageOps


def upright(image: Image.Image) -> Image.Image:
    """A new, loaded image: `image` turned or mirrored as its EXIF Orientation says (a copy when it has
    none), the tag removed so nothing turns it twice."""
    return ImageOps.exif_transpose(image)
