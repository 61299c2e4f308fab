"""Where each precision's weights come from: the reference folder, or a converted folder in the cache.

Converted folders are cached under a key made of the source's resolved path, its newest file mtime and
total size, the converter's source code, the quantization and the recipe options (an imatrix by its
content hash, a target size in bytes), so a changed source, converter or imatrix converts again and nothing
else does. Synthetic models are cached by size and seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from zimage_lite.errors import UsageError

log = logging.getLogger(__name__)

REFERENCE = "bf16"  # the reference precision: the source folder itself, never converted
QUANT_ORDER = ("fp8", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")  # report order, best quality first
# Precisions that load another precision's files with a runtime option switched on; asked for by name
# only (not in the default list). fp8-native: FP8 weights on FP8 tensor cores (kernels/fp8_matmul.py).
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {"fp8-native": ("fp8", {"fp8_matmul": "native"})}


def base_precision(precision: str) -> tuple[str, dict[str, str]]:
    """(the precision whose files a row loads, the engine options it switches on)."""
    return VARIANTS.get(precision, (precision, {}))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zimage-lite" / "bench"


def converter():
    """`zimage_lite.convert.convert`, or None while this install has no converter."""
    try:
        from zimage_lite.convert import convert
    except ImportError:
        try:
            from zimage_lite.convert.converter import convert
        except ImportError:
            return None
    return convert


def available_precisions() -> list[str]:
    """The reference, then every quantization the converter offers (GGUF/FP8 types, then mixed presets)."""
    if converter() is None:
        return [REFERENCE]
    from zimage_lite.quant.policy import PRESETS

    quants = [q for q in QUANT_ORDER if q in PRESETS]
    return [REFERENCE, *quants, *(p for p in PRESETS if p not in quants and p != REFERENCE)]


def parse_precisions(text: str | None) -> list[str]:
    """Validated precision list with the reference first (added when missing: quality needs it)."""
    available = available_precisions()
    if text is None:
        return available
    wanted = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in wanted if base_precision(p)[0] not in available]
    if unknown:
        hint = "" if converter() else " (no converter installed: only the reference)"
        choices = ", ".join([*available, *(v for v, (base, _) in VARIANTS.items() if base in available)])
        raise UsageError(f"unknown precision {', '.join(unknown)}: available {choices}{hint}")
    if REFERENCE not in wanted:
        log.info("adding the %s reference: every quality figure is measured against it", REFERENCE)
    return [REFERENCE, *dict.fromkeys(p for p in wanted if p != REFERENCE)]


def source_fingerprint(src: Path) -> str:
    """Resolved path + newest mtime + total size of the files under src (a folder's own mtime lags)."""
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    size = sum(p.stat().st_size for p in files)
    return f"{src.resolve()}|{newest}|{size}"


def converter_fingerprint() -> str:
    """Hash of the converter's and quant formats' source: a changed converter never reuses old files."""
    import zimage_lite

    root = Path(zimage_lite.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("convert/*.py"), *root.glob("quant/*.py"), *root.glob("weights/*_io.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recipe_key(options) -> str:
    """The part of a cache key a convert.recipe.RecipeOptions adds: "" for a plain conversion."""
    if options is None or not options.any():
        return ""
    imatrix = "" if options.imatrix is None else file_sha256(options.imatrix)[:16]
    return f"|imatrix={imatrix}|rules={options.rules}|target={options.target_size}"


def converted_path(src: Path, quant: str, cache: Path, options=None) -> Path:
    key = f"{source_fingerprint(src)}|{converter_fingerprint()}|{quant}{recipe_key(options)}"
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    tag = "-imatrix" if options is not None and options.imatrix is not None else ""
    return cache / f"{src.resolve().name}-{quant.replace(':', '-')}{tag}-{key}"


def precision_source(
    src: Path, precision: str, cache: Path, progress: bool, options=None
) -> tuple[Path, dict]:
    """(folder to load, {"cached": bool, "convert_s": float | None}) for one precision. `options`: a
    convert.recipe.RecipeOptions (an imatrix, a target size: then `precision` only names the row)."""
    precision, _ = base_precision(precision)
    if precision == REFERENCE:
        return src, {"cached": None, "convert_s": None}
    from zimage_lite.weights.components import MANIFEST

    out = converted_path(src, precision, cache, options)
    if (out / MANIFEST).is_file():
        return out, {"cached": True, "convert_s": None}
    convert = converter()
    if convert is None:
        raise UsageError(f"precision {precision} needs the converter (zimage_lite.convert)")
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quant = None if options is not None and options.target_size is not None else precision
    convert(src, out, quant, force=True, progress=progress, options=options)
    return out, {"cached": False, "convert_s": time.perf_counter() - start}


def controlnet_source(src: Path, precision: str, cache: Path, progress: bool) -> tuple[Path, dict]:
    """(ControlNet file to load, convert info) for one precision: the file itself for the reference,
    else a converted file in the cache (keyed as converted model folders are)."""
    precision, _ = base_precision(precision)
    if precision == REFERENCE:
        return src, {"cached": None, "convert_s": None}
    out = converted_path(src, precision, cache).with_suffix(".safetensors" if precision == "fp8" else ".gguf")
    if out.is_file():
        return out, {"cached": True, "convert_s": None}
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    converter()(src, out, precision, force=True, progress=progress)
    return out, {"cached": False, "convert_s": time.perf_counter() - start}


def synthetic_controlnet(size: str, cache: Path, seed: int = 0) -> Path:
    """A cached random-weight 2.1-style ControlNet for the synthetic model of `size`."""
    import torch

    from zimage_lite.synthetic import SIZES, write_synthetic_controlnet

    out = cache / f"synthetic-{size}-seed{seed}-controlnet.safetensors"
    if not out.is_file():
        part = out.with_name(out.name + ".part")
        dtype = torch.bfloat16 if size == "full" else torch.float32
        write_synthetic_controlnet(part, SIZES[size]().dit, seed=seed + 7, dtype=dtype)
        part.rename(out)
    return out


def synthetic_model(size: str, cache: Path, seed: int = 0) -> Path:
    """A cached random-weight model (float32; full size: bfloat16, the real checkpoint's dtype)."""
    import torch

    from zimage_lite.synthetic import write_synthetic_model

    out = cache / f"synthetic-{size}-seed{seed}"
    if (out / "model_index.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    dtype = torch.bfloat16 if size == "full" else torch.float32
    log.info("writing the synthetic %s model to %s", size, out)
    write_synthetic_model(part, size, seed=seed, dtype=dtype)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)  # complete folders only: an interrupted write leaves a .part that we redo
    return out
