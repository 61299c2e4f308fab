"""Generated images -> bytes in the requested format (PNG with the generation's text metadata, JPEG,
WebP), then kept as a file (url) or returned as base64."""

from __future__ import annotations

import base64
import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from zimage_lite.serve.files import FileStore
from zimage_lite.serve.params import OutputSpec


def encode(image: Image.Image, spec: OutputSpec, meta: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    if spec.format == "png":
        info = PngInfo()
        for k, v in meta.items():
            info.add_itxt(k, v)  # iTXt: UTF-8 prompts survive
        image.save(buf, format="PNG", pnginfo=info)
    else:
        quality = 95 if spec.compression is None else spec.compression
        image.save(buf, format=spec.format.upper(), quality=quality)
    return buf.getvalue()


def results(
    images: list[Image.Image], spec: OutputSpec, meta: dict[str, str], files: FileStore, keep_files: bool
) -> list[dict]:
    """One dict per image: `b64_json` when asked, and `file` (its id.ext) when kept as a file (url
    responses, and every job of the jobs API)."""
    out = []
    for i, image in enumerate(images):
        data = encode(image, spec, {**meta, "batch_index": str(i)})
        entry: dict = {"index": i}
        if keep_files or spec.response_format == "url":
            entry["file"] = files.save(data, spec.ext)
        if spec.response_format == "b64_json":
            entry["b64_json"] = base64.b64encode(data).decode("ascii")
        out.append(entry)
    return out
