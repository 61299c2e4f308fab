"""`zimage-lite inspect FILE|DIR`: what a checkpoint holds, without reading any tensor data.

`inspect_path(path)` returns a JSON-able dict: format, detected component (or why it is not one),
architecture key, tensor count and bytes per storage type, bytes per transformer block, metadata (long
lists summarised), and which quantizer wrote the file (`zimage_lite.quantizer`: ggml's library or
zimage-lite's torch fallback; absent in files others wrote). `format_report(report)` renders it as text.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from zimage_lite.errors import CheckpointError, not_found
from zimage_lite.quant.formats import QUANTIZER_KEY
from zimage_lite.variants import VARIANTS, read_variant
from zimage_lite.weights.checkpoint import (
    classify_keys,
    is_model_folder,
    open_checkpoint,
    read_manifest,
    stored_keys_and_shape,
)
from zimage_lite.weights.components import COMPONENTS, MANIFEST, resolve_model

_BLOCK = re.compile(
    r"^(?:model\.diffusion_model\.)?(layers|noise_refiner|context_refiner|blk|model\.layers)\.(\d+)\."
)
_MAX_LIST = 8


def _summarise(value: Any) -> Any:
    if isinstance(value, list) and len(value) > _MAX_LIST:
        return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def _blocks(source) -> dict[str, dict[str, int]]:
    """Bytes per block group: {"layers": {"count": n, "bytes_per_block": b, "max_bytes": m}, ...}."""
    per: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for key in source.keys():
        m = _BLOCK.match(key)
        if m:
            per[m.group(1)][int(m.group(2))] += source.nbytes(key)
    return {
        group: {
            "count": len(sizes),
            "bytes_per_block": sum(sizes.values()) // len(sizes),
            "max_bytes": max(sizes.values()),
        }
        for group, sizes in per.items()
    }


def _file_report(path: Path) -> dict[str, Any]:
    source = open_checkpoint(path, check_types=False)  # show files with types we cannot decode, too
    keys = source.keys()
    types: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for key in keys:
        entry = types[source.qtype(key)]
        entry["tensors"] += 1
        entry["bytes"] += source.nbytes(key)
    report: dict[str, Any] = {
        "path": str(path),
        "format": source.format,
        "architecture": source.architecture,
        "fp8_variant": source.fp8_variant,
        "tensors": len(keys),
        "bytes": sum(t["bytes"] for t in types.values()),
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "blocks": _blocks(source),
    }
    if source.metadata.get("general.type") == "imatrix":  # zimage-lite imatrix / llama-imatrix output
        entries = sum(1 for k in keys if k.endswith(".in_sum2"))
        chunks = source.metadata.get("imatrix.chunk_count")
        report.update(component=None, problem=f"an importance matrix: {entries} entries, {chunks} chunks")
    else:
        try:
            component, style, prefix = classify_keys(*stored_keys_and_shape(source), source.architecture)
            report.update(component=component, key_style=style, prefix=prefix)
            if component == "controlnet":
                report["controlnet"] = _controlnet(path)
        except CheckpointError as exc:
            report.update(component=None, problem=str(exc))
    if source.format == "gguf":
        report["has_tokenizer"] = source.field("tokenizer.ggml.tokens") is not None
    report["quantizer"] = source.metadata.get(QUANTIZER_KEY)
    report.update(_calibration(source.metadata))
    report["metadata"] = {k: _summarise(v) for k, v in source.metadata.items()}
    return report


def _controlnet(path: Path) -> dict[str, Any]:
    """The branch's version and where its hints go (or why it cannot be used)."""
    from zimage_lite.weights.names_controlnet import read_controlnet

    try:
        cfg = read_controlnet(path)[3]
    except CheckpointError as exc:
        return {"problem": str(exc)}
    return {"version": cfg.version, "places": list(cfg.places), "refiner_places": list(cfg.refiner_places),
            "control_in_dim": cfg.control_in_dim, "dim": cfg.dim}  # fmt: skip


def _calibration(metadata: dict[str, Any]) -> dict[str, Any]:
    """What convert --imatrix / --target-size / --tensor-type-rules recorded (llama.cpp's keys; ours)."""
    import json

    from zimage_lite.convert.calibrated import IMATRIX_KEYS
    from zimage_lite.convert.recipe import RECIPE_KEY

    out: dict[str, Any] = {}
    if IMATRIX_KEYS["file"] in metadata:
        out["imatrix"] = {k: metadata.get(key) for k, key in IMATRIX_KEYS.items()}
    if RECIPE_KEY in metadata:
        try:
            out["recipe"] = json.loads(metadata[RECIPE_KEY])
        except (TypeError, ValueError):
            out["recipe"] = metadata[RECIPE_KEY]
    return out


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Report for a checkpoint file, a component folder, or a whole model folder (one entry per component)."""
    path = Path(path).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise not_found(path)
    if not is_model_folder(path):
        return _file_report(path)
    fmt = "zimage-lite" if (path / MANIFEST).is_file() else "diffusers"
    paths = resolve_model(path)
    report: dict[str, Any] = {"path": str(path), "format": fmt, "component": "model", "components": {}}
    if fmt == "zimage-lite":
        manifest = read_manifest(path)
        report["quant"] = manifest.get("quant")
        for key in ("imatrix", "recipe"):
            if key in manifest:
                report[key] = manifest[key]
    variant = read_variant(path)
    report["variant"] = {
        "name": variant.name,
        "decided_by": variant.decided_by,
        **variant.scheduler.to_dict(),
    }
    for name in COMPONENTS:
        p = getattr(paths, name)
        if name == "tokenizer":
            report["components"][name] = {"path": str(p)}
            continue
        report["components"][name] = _file_report(p)
    report["bytes"] = sum(c.get("bytes", 0) for c in report["components"].values())
    return report


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _file_lines(r: dict[str, Any], indent: str = "") -> list[str]:
    detected = r.get("component") or f"not a Z-Image component ({r.get('problem')})"
    if r.get("controlnet"):
        c = r["controlnet"]
        detected += (f" {c['version']} (hints after layers {c['places']}, refiner {c['refiner_places']})"
                     if "version" in c else f" ({c['problem']})")  # fmt: skip
    lines = [
        f"{indent}{r['path']}",
        f"{indent}  format:       {r['format']}" + (f" ({r['fp8_variant']})" if r.get("fp8_variant") else ""),
        f"{indent}  detected:     {detected}"
        + (f", {r['key_style']} names" if r.get("key_style") else "")
        + (f", prefix {r['prefix']!r}" if r.get("prefix") else ""),
        f"{indent}  architecture: {r.get('architecture') or '-'}",
        f"{indent}  tensors:      {r['tensors']} ({_gb(r['bytes'])})",
    ]
    for qtype, t in r["types"].items():
        lines.append(f"{indent}    {qtype:<9} {t['tensors']:>5} tensors  {_gb(t['bytes'])}")
    for group, b in r.get("blocks", {}).items():
        lines.append(
            f"{indent}  {group}: {b['count']} blocks, {_gb(b['bytes_per_block'])} per block (max {_gb(b['max_bytes'])})"
        )
    if r.get("quantizer"):
        lines.append(f"{indent}  quantizer:    {r['quantizer']}")
    lines += _calibration_lines(r, indent)
    if r.get("has_tokenizer"):
        lines.append(f"{indent}  tokenizer:    embedded (tokenizer.ggml.*)")
    if r.get("metadata"):
        lines.append(f"{indent}  metadata:")
        lines += [f"{indent}    {k} = {v}" for k, v in r["metadata"].items()]
    return lines


def _calibration_lines(r: dict[str, Any], indent: str) -> list[str]:
    lines = []
    if r.get("imatrix"):
        m = r["imatrix"]
        lines.append(f"{indent}  imatrix:      {m.get('file')} (dataset {m.get('dataset')!r}, {m.get('entries')} entries, "
                     f"{m.get('chunks')} chunks)")  # fmt: skip
    recipe = r.get("recipe")
    if isinstance(recipe, dict):
        parts = []
        if recipe.get("target_size"):
            parts.append(
                f"target {_gb(recipe['target_size'])}, estimated error {recipe.get('estimated_error', 0):.4g}"
            )
        if recipe.get("rules"):
            parts.append(f"rules {recipe['rules']!r}")
        if (
            isinstance(recipe.get("types"), dict)
            and recipe["types"]
            and not isinstance(next(iter(recipe["types"].values())), int)
        ):
            counts: dict[str, int] = defaultdict(int)
            for t in recipe["types"].values():
                counts[t] += 1
            parts.append(", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
        lines.append(f"{indent}  recipe:       {'; '.join(parts)}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    if report.get("component") != "model":
        return "\n".join(_file_lines(report))
    lines = [
        f"{report['path']}: {report['format']} model folder"
        + (f" ({report['quant']})" if report.get("quant") else "")
    ]
    lines.append(f"  total: {_gb(report['bytes'])}")
    lines += [line.replace("  ", "", 1) for line in _calibration_lines(report, "  ")]
    v = report["variant"]
    d = VARIANTS[v["name"]]
    lines.append(
        f"  variant: {v['name']} (decided by {v['decided_by']}; scheduler shift {v['shift']:g}; defaults "
        f"{d.steps} steps, guidance {d.guidance:g})"
    )
    for name, sub in report["components"].items():
        lines.append(f"  [{name}]")
        lines += _file_lines(sub, "    ") if "format" in sub else [f"    {sub['path']}"]
    return "\n".join(lines)
