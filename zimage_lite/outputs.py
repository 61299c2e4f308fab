"""What a command writes: image files by their extension, and the checks that keep outputs off inputs.

One rule for every command (generate, convert, synthetic, bench): an existing output is replaced only
with `--force`, and never while it is one of the command's own inputs or another of its outputs. Files
are written under a temporary name and renamed when complete (convert/atomic.py), with the umask's mode.

Image formats follow the extension: PNG keeps the metadata as iTXt chunks (UTF-8); JPEG and WebP carry
the same keys as one JSON object in the EXIF UserComment (charset "UNICODE", UTF-16; what A1111 and
ComfyUI write and read), since neither format has PNG's free-form text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from zimage_lite.convert.atomic import refuse_existing
from zimage_lite.errors import UsageError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\0"  # EXIF UserComment charset prefix: UCS-2/UTF-16 text follows


def image_format(path: Path) -> str:
    """Pillow's format name for an output path's extension; UsageError for any other extension."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        got = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UsageError(f"{path}: {got} is not an image type zimage-lite writes: use .png, .jpg or .webp")
    return fmt


def _text(value: str) -> str:
    """`value` as text any format can store: a path that is not UTF-8 (its bytes arrive as lone
    surrogates) keeps its readable part, U+FFFD for each undecodable byte."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _exif(meta: dict[str, str]):
    from PIL import Image

    exif = Image.Exif()
    text = json.dumps(meta, ensure_ascii=False)
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + text.encode("utf-16-be")
    return exif


def save_image(image, path: Path, meta: dict[str, str], target: Path | None = None) -> None:
    """Write `image` to `path` in the format the extension of `target` (default: `path`; the name a
    temporary file will be renamed to) says, with `meta` (see the module docstring)."""
    fmt = image_format(path if target is None else target)
    meta = {k: _text(v) for k, v in meta.items()}
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in meta.items():
            info.add_itxt(k, v)  # iTXt: UTF-8, so Chinese prompts survive
        image.save(path, format="PNG", pnginfo=info)
    else:
        image.save(path, format=fmt, exif=_exif(meta), quality=JPEG_QUALITY)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `save_image` wrote, from a PNG, JPEG or WebP file ({} when it has none)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.format == "PNG":
            return dict(img.text)
        raw = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(raw, bytes) or not raw.startswith(_UNICODE):
        return {}
    return json.loads(raw[len(_UNICODE) :].decode("utf-16-be"))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: compare the names they resolve to
        return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path], force: bool) -> None:
    """Refuse, before any work, an output that is one of the inputs (or lies inside an input folder), that
    another output names too, or that exists without `force`. Keys are what the user typed (`-o`)."""
    items = list(outputs.items())
    for i, (what, path) in enumerate(items):
        for other, other_path in items[:i]:
            if _same(path, other_path):
                raise UsageError(f"{path}: {what} and {other} name the same file: give each its own")
        for source, src in inputs.items():
            if _same(path, src) or (path.exists() and _inside(path, src)):
                raise UsageError(f"{path}: {what} would overwrite the {source} it reads: write elsewhere")
        refuse_existing(path, force)


def existing(paths: Iterable[str | Path | None]) -> list[Path]:
    """The given paths that are not None, as Paths (inputs that may be absent)."""
    return [Path(p).expanduser() for p in paths if p is not None]
