"""The report.json schema as data, and a checker: `validate_report(json.load(f))` -> list of problems.

Documented for people in docs/bench-report-schema.md; keep the two in step (the schema version changes
when a field changes meaning or goes away; adding a field does not).
"""

from __future__ import annotations

NUM = (int, float)
NONE = type(None)
OPT_NUM = (int, float, NONE)
OPT_STR = (str, NONE)
OPT_INT = (int, NONE)
PSNR = (int, float, str, NONE)  # "inf" for identical images

ENVIRONMENT = {
    "python": str, "platform": str, "cpu": str, "cpu_count": OPT_INT, "torch_threads": int, "torch": str,
    "torch_cuda": OPT_STR, "triton": OPT_STR, "diffusers": OPT_STR, "zimage_lite": OPT_STR, "gpu": (dict, NONE),
    "load_average_before": (list, NONE), "load_average_after": (list, NONE),
}  # fmt: skip
GPU = {"name": str, "capability": str, "memory_bytes": int, "driver": OPT_STR}
SETTINGS = {
    "model": OPT_STR, "synthetic": OPT_STR, "reference_folder": str, "reference_precision": str,
    "precisions": list, "baselines": list, "prompts": list, "seeds": list, "steps": int, "width": int,
    "height": int, "repeats": int, "warmup": int, "device": OPT_STR, "dtype": OPT_STR, "vram": OPT_STR,
    "cards": list, "hires": (dict, NONE), "cfg": OPT_NUM, "also_dtypes": list,
    "imatrix": (dict, NONE), "target_sizes": list, "tensor_type_rules": OPT_STR,
}  # fmt: skip
PROMPT = {"id": str, "kind": str, "text": str}
ROW = {
    "name": str, "kind": str, "precision": str, "status": str, "reason": OPT_STR, "compute_dtype": OPT_STR,
    "device": OPT_STR, "source": OPT_STR, "convert": (dict, NONE), "load_s": OPT_NUM, "files": (dict, NONE),
    "transformer_types": (dict, NONE), "quantizer": OPT_STR, "imatrix": OPT_STR, "recipe": (dict, NONE), "vram_cap": (dict, NONE), "timing": dict, "memory": dict,
    "quality": dict, "deterministic": (bool, NONE), "fp32_fallback_steps": OPT_INT,
}  # fmt: skip
CONVERT = {"cached": (bool, NONE), "convert_s": OPT_NUM}
FILES = {
    "transformer_bytes": OPT_INT,
    "text_encoder_bytes": OPT_INT,
    "vae_bytes": OPT_INT,
    "total_bytes": OPT_INT,
}
IMATRIX = {"file": str, "sha256": str, "dataset": str, "entries": int, "chunks": int}
RECIPE = {
    "imatrix_sha256": OPT_STR, "imatrix_tensors": OPT_INT, "rules": OPT_STR, "target_size": OPT_STR, "target_bytes": OPT_INT,
    "planned_bytes": OPT_INT, "gguf_bytes": int, "types": (dict, NONE),
}  # fmt: skip
VRAM_CAP = {"requested": OPT_STR, "applied": bool, "note": OPT_STR, "card": OPT_STR}
TIMING = {
    "samples": int,
    "s_per_step_median": OPT_NUM,
    "s_per_image_median": OPT_NUM,
    "s_per_image_min": OPT_NUM,
    "s_per_image_max": OPT_NUM,
    "spread": OPT_NUM,
    "comparable": (bool, NONE),
    "load_1m_median": OPT_NUM,
    "phases_s_median": dict,
}
MEMORY = {"peak_vram_bytes": OPT_INT, "pinned_host_bytes": OPT_INT, "h2d_bytes_per_image": OPT_NUM}
QUALITY = {
    "psnr_db_mean": PSNR, "psnr_db_min": PSNR, "ssim_mean": OPT_NUM, "ssim_min": OPT_NUM,
    "latent_rel_error_mean": OPT_NUM, "latent_rel_error_max": OPT_NUM, "per_image": list,
}  # fmt: skip
PER_IMAGE = {
    "prompt_id": str, "seed": int, "psnr_db": PSNR, "ssim": OPT_NUM, "latent_rel_error": OPT_NUM,
    "repeat_latent_rel_error": OPT_NUM, "image": OPT_STR,
}  # fmt: skip
TOP = {
    "schema": str, "schema_version": int, "created_utc": str, "environment": dict, "settings": dict,
    "rows": list, "files": dict,
}  # fmt: skip
STATUSES = ("ok", "skipped", "failed")
KINDS = ("zimage-lite", "diffusers")


def _check(obj, spec: dict, where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object")
        return
    for key, types in spec.items():
        if key not in obj:
            problems.append(f"{where}.{key}: missing")
        elif isinstance(obj[key], bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            problems.append(f"{where}.{key}: bool where {types} expected")  # bool is an int subclass
        elif not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: {type(obj[key]).__name__} is not {types}")
    for key, value in obj.items():
        if (
            key.endswith(("psnr_db", "psnr_db_mean", "psnr_db_min"))
            and isinstance(value, str)
            and value != "inf"
        ):
            problems.append(f"{where}.{key}: the only string allowed is 'inf' (got {value!r})")


def _check_row(row: dict, where: str, problems: list[str]) -> None:
    if not isinstance(row, dict):
        problems.append(f"{where}: expected an object")
        return
    _check(row, ROW, where, problems)
    if row.get("status") not in STATUSES:
        problems.append(f"{where}.status: {row.get('status')!r} not in {STATUSES}")
    if row.get("kind") not in KINDS:
        problems.append(f"{where}.kind: {row.get('kind')!r} not in {KINDS}")
    for key, spec in (("timing", TIMING), ("memory", MEMORY), ("quality", QUALITY)):
        _check(row.get(key), spec, f"{where}.{key}", problems)
    for key, spec in (("convert", CONVERT), ("files", FILES), ("vram_cap", VRAM_CAP), ("recipe", RECIPE)):
        if row.get(key) is not None:
            _check(row[key], spec, f"{where}.{key}", problems)
    for i, entry in enumerate((row.get("quality") or {}).get("per_image") or []):
        _check(entry, PER_IMAGE, f"{where}.quality.per_image[{i}]", problems)
    if row.get("status") == "ok" and not (row.get("timing") or {}).get("samples"):
        problems.append(f"{where}: status ok but no timed samples")


def validate_report(report: dict) -> list[str]:
    """Problems with a loaded report.json (empty when it follows the schema)."""
    from zimage_lite.bench.report import SCHEMA, SCHEMA_VERSION

    problems: list[str] = []
    _check(report, TOP, "report", problems)
    if problems:
        return problems
    if report["schema"] != SCHEMA or report["schema_version"] != SCHEMA_VERSION:
        problems.append(
            f"report: schema {report['schema']} v{report['schema_version']} is not {SCHEMA} v{SCHEMA_VERSION}"
        )
    _check(report["environment"], ENVIRONMENT, "environment", problems)
    if isinstance(report["environment"].get("gpu"), dict):
        _check(report["environment"]["gpu"], GPU, "environment.gpu", problems)
    _check(report["settings"], SETTINGS, "settings", problems)
    if isinstance(report["settings"].get("imatrix"), dict):
        _check(report["settings"]["imatrix"], IMATRIX, "settings.imatrix", problems)
    for i, p in enumerate(report["settings"].get("prompts") or []):
        _check(p, PROMPT, f"settings.prompts[{i}]", problems)
    for i, row in enumerate(report["rows"]):
        _check_row(row, f"rows[{i}]", problems)
    ref = [r for r in report["rows"] if r.get("name") == report["settings"].get("reference_precision")]
    if len(ref) != 1:
        problems.append(f"rows: expected one reference row, found {len(ref)}")
    return problems
