"""report.json (schema in docs/bench-report-schema.md), report.md, and the calls that draw the pictures.

JSON has no infinity: a PSNR of identical images (the reference row) is written as the string "inf", and
any NaN as null. `float(value)` reads both number and "inf" back.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path

from zimage_lite.bench import draw, sources

SCHEMA = "zimage-lite-bench"
SCHEMA_VERSION = 1


def json_safe(value):
    """Recursively: inf -> "inf" / "-inf", NaN -> None; everything else as is."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


SPREAD_LIMIT = 0.3  # repeats of one (prompt, seed) further apart than 30% of their median: not comparable


def spread(repeat_s: dict[str, list[float]]) -> float | None:
    """The widest (max - min) / median over a row's (prompt, seed) repeats; None with one repeat each."""
    widths = [(max(v) - min(v)) / statistics.median(v) for v in repeat_s.values() if len(v) > 1]
    return max(widths) if widths else None


def _timing(row) -> dict:
    samples = row.samples
    phases = sorted({k for s in samples for k in s.phases_s})
    seconds = [s.seconds for s in samples]
    width = spread(row.repeat_s)
    return {
        "samples": len(samples),
        "s_per_step_median": _median([t for s in samples for t in s.steps_s]),
        "s_per_image_median": _median(seconds),
        "s_per_image_min": min(seconds, default=None),
        "s_per_image_max": max(seconds, default=None),
        "spread": width,
        "comparable": None if width is None else width <= SPREAD_LIMIT,
        "load_1m_median": _median(row.load_1m),
        "phases_s_median": {k: _median([s.phases_s.get(k) for s in samples]) for k in phases},
    }


def _quality(per_image: list[dict]) -> dict:
    def pick(key):
        return [e[key] for e in per_image if e[key] is not None]

    psnrs, ssims, errs = pick("psnr_db"), pick("ssim"), pick("latent_rel_error")
    return {
        "psnr_db_mean": statistics.fmean(psnrs) if psnrs else None,  # inf when any image is identical
        "psnr_db_min": min(psnrs, default=None),
        "ssim_mean": statistics.fmean(ssims) if ssims else None,
        "ssim_min": min(ssims, default=None),
        "latent_rel_error_mean": statistics.fmean(errs) if errs else None,
        "latent_rel_error_max": max(errs, default=None),
        "per_image": per_image,
    }


def build_row(row) -> dict:
    info = row.info
    peaks = [s.peak_device_bytes for s in row.samples if s.peak_device_bytes is not None]
    return {
        "name": row.name,
        "kind": row.kind,
        "precision": row.precision,
        "status": row.status,
        "reason": row.reason,
        "compute_dtype": info.get("compute_dtype"),
        "device": info.get("device"),
        "source": info.get("source"),
        "convert": info.get("convert"),
        "load_s": info.get("load_s"),
        "files": info.get("files"),
        "transformer_types": info.get("transformer_types"),
        "quantizer": info.get("quantizer"),
        "imatrix": info.get("imatrix"),
        "recipe": info.get("recipe"),  # +imatrix / target:<size> rows (bench/calibrated.py); else None
        "vram_cap": info.get("vram_cap"),
        "timing": _timing(row),
        "memory": {
            "peak_vram_bytes": max(peaks) if peaks else None,
            "pinned_host_bytes": info.get("pinned_host_bytes"),
            "h2d_bytes_per_image": _median([s.h2d_bytes for s in row.samples]),
        },
        "quality": _quality(row.quality),
        "deterministic": info.get("deterministic"),
        # steps redone in float32 over the row's timed generations (float16 rows; runtime/fp32_fallback.py)
        "fp32_fallback_steps": _sum_or_none([s.fp32_fallback_steps for s in row.samples]),
    }


def _sum_or_none(values: list) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu(device: str | None) -> dict | None:
    import torch

    if not torch.cuda.is_available() or (device or "cuda").startswith("cpu"):
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        import subprocess

        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()[0].strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "driver": driver,
    }


def environment(device: str | None) -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton") or _version("triton-windows"),
        "diffusers": _version("diffusers"),
        "zimage_lite": _version("zimage-lite"),
        "gpu": _gpu(device),
    }


def settings(cfg, reference: Path) -> dict:
    return {
        "model": str(cfg.model) if cfg.model else None,
        "synthetic": cfg.synthetic,
        "reference_folder": str(reference),
        "reference_precision": sources.REFERENCE,
        "precisions": cfg.precisions,
        "baselines": cfg.baselines,
        "prompts": [p.to_dict() for p in cfg.prompts],
        "seeds": cfg.seeds,
        "steps": cfg.steps,
        "width": cfg.width,
        "height": cfg.height,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "also_dtypes": cfg.also_dtypes,
        "vram": cfg.vram,
        "cards": cfg.cards,
        "hires": None if cfg.hires is None else {"scale": cfg.hires, "strength": cfg.hires_strength},
        "cfg": cfg.cfg,
        "imatrix": cfg.imatrix,
        "target_sizes": cfg.target_sizes,
        "tensor_type_rules": cfg.tensor_type_rules,
    }


def _grid_label(row, built: dict) -> str:
    q, t = built["quality"], built["timing"]["s_per_image_median"]
    psnr = q["psnr_db_mean"]
    quality = (
        "reference"
        if psnr is not None and math.isinf(psnr) and row.name == sources.REFERENCE
        else (f"PSNR {psnr:.1f} dB" if psnr is not None and math.isfinite(psnr) else "PSNR inf")
    )
    return f"{row.name}\n{quality}\n{t:.2f} s/image" if t is not None else f"{row.name}\n{quality}"


def _atomic(path: Path, write) -> None:
    """write(tmp) next to `path`, then rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(cfg, reference: Path, rows, load=(None, None)) -> dict:
    """Write report.json, report.md, grid.png and plot.png under cfg.out; return the report dict. `load`:
    the machine's (1, 5, 15-minute) load averages before and after the run."""
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            **environment(cfg.device),
            "load_average_before": load[0],
            "load_average_after": load[1],
        },
        "settings": settings(cfg, reference),
        "rows": [build_row(r) for r in rows],
        "files": {"markdown": "report.md", "grid": "grid.png", "plot": "plot.png"},
    }
    out = cfg.out
    done = [r for r in rows if r.status == "ok"]
    labels = [_grid_label(r, row) for r, row in zip(rows, report["rows"]) if r.status == "ok"]
    columns = [f"{p.id} s{s}" for p in cfg.prompts for s in cfg.seeds]
    from zimage_lite.bench.markdown import render_markdown

    grid = draw.grid([(label, r.thumbs) for label, r in zip(labels, done)], columns)
    _atomic(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    plot = draw.quality_time_plot(report["rows"])
    _atomic(out / "plot.png", lambda tmp: plot.save(tmp, format="PNG"))
    text = json.dumps(json_safe(report), indent=2, ensure_ascii=False) + "\n"
    _atomic(out / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    markdown = render_markdown(report)
    _atomic(out / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return report
