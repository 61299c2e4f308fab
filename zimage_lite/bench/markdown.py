"""report.md: one table a person reads first, then the conditions that make its numbers comparable."""

from __future__ import annotations

import math


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_psnr(x: float | None) -> str:
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def fmt_num(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _row_line(r: dict) -> str:
    t, m, q = r["timing"], r["memory"], r["quality"]
    phases = t["phases_s_median"]
    cells = [
        f"**{r['name']}**" if r["kind"] == "zimage-lite" else r["name"],
        r["compute_dtype"] or "–",
        fmt_bytes((r["files"] or {}).get("total_bytes")),
        fmt_s(t["s_per_step_median"]),
        _s_per_image(t),
        " / ".join(fmt_s(phases.get(k)) for k in ("text_encoder", "denoise", "vae")),
        fmt_bytes(m["peak_vram_bytes"]),
        fmt_bytes(m["pinned_host_bytes"]),
        fmt_bytes(m["h2d_bytes_per_image"]),
        fmt_psnr(q["psnr_db_mean"]),
        fmt_num(q["ssim_mean"], ".4f"),
        fmt_num(q["latent_rel_error_mean"], ".2e"),
    ]
    return "| " + " | ".join(cells) + " |"


def _s_per_image(t: dict) -> str:
    """median (min-max), and a mark when the repeats spread too wide to compare (report.SPREAD_LIMIT)."""
    text = fmt_s(t["s_per_image_median"])
    if t.get("s_per_image_max") is not None and t["samples"] > 1:
        text += f" ({fmt_s(t['s_per_image_min'])}–{fmt_s(t['s_per_image_max'])})"
    if t.get("comparable") is False:
        text += f" **not comparable** (spread {t['spread']:.0%})"
    return text


HEADER = (
    "| row | compute | files | s/step | s/image (min–max) | text enc / denoise / VAE (s) | peak VRAM | pinned host "
    "| H2D / image | PSNR (dB) | SSIM | latent rel. err |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _environment(env: dict, s: dict, created: str) -> list[str]:
    gpu = env["gpu"]
    gpu_text = (
        f"{gpu['name']} (sm {gpu['capability']}, {fmt_bytes(gpu['memory_bytes'])}, driver {gpu['driver'] or '?'})"
        if gpu
        else "none (CPU run)"
    )
    items = [
        ("date (UTC)", created),
        ("GPU", gpu_text),
        ("CPU", f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"),
        ("torch / CUDA / triton", f"{env['torch']} / {env['torch_cuda'] or '–'} / {env['triton'] or '–'}"),
        ("diffusers", env["diffusers"] or "not installed"),
        ("zimage-lite", env["zimage_lite"] or "?"),
        ("python / platform", f"{env['python']} / {env['platform']}"),
        (
            "load average (1/5/15 min)",
            f"{_load(env.get('load_average_before'))} at the start, "
            f"{_load(env.get('load_average_after'))} at the end",
        ),
        ("VRAM cap", s["vram"] or "none"),
        ("cards emulated", ", ".join(s.get("cards") or []) or "none"),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in items)]


def _load(values: list | None) -> str:
    return "–" if not values else " / ".join(f"{v:.2f}" for v in values)


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def render_markdown(report: dict) -> str:
    s, env, rows = report["settings"], report["environment"], report["rows"]
    model = s["model"] or f"synthetic {s['synthetic']} model (random weights)"
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        f"# zimage-lite bench: {model}",
        "",
        f"{s['width']}x{s['height']}, {s['steps']} steps, {len(s['prompts'])} prompts x {len(s['seeds'])} "
        f"seed(s) {s['seeds']}, {s['repeats']} timed repeat(s) after {s['warmup']} warm-up generation(s) "
        f"per row. Reference: the **{s['reference_precision']}** row (the source weights).",
        "",
        HEADER,
        *(_row_line(r) for r in ok),
        "",
        "Times are medians over every timed generation of the row (warm-up excluded), the fastest and "
        "slowest in brackets; the rows' repeats are interleaved (each round runs every row once), and a row "
        "whose repeats of one prompt and seed differ by more than 30% of their median is marked **not "
        "comparable**: the machine was busy (see the load average below). s/step pools the "
        "denoising steps. PSNR / SSIM compare each 8-bit RGB image with the reference image of the same "
        "prompt and seed (SSIM: Gaussian window, sigma 1.5), averaged over images; latent rel. err is "
        "||x - ref|| / ||ref|| of the final latents. Compute is the dtype the matmuls ran in (on a CPU the "
        "reference computes in float32). – = not measured by this engine.",
    ]
    not_ok = [r for r in rows if r["status"] != "ok"]
    if not_ok:
        lines += ["", "Rows not measured:", ""]
        lines += [f"- {r['name']}: {r['status']}: {r['reason']}" for r in not_ok]
    notes = [r for r in ok if r.get("deterministic") is False]
    if notes:
        lines += ["", "Not bit-reproducible (warm-up vs first timed latents differ): "]
        lines[-1] += ", ".join(r["name"] for r in notes)
    typed = [r for r in ok if r.get("transformer_types")]
    if typed:
        lines += ["", "Transformer tensors by storage type (a K-quant whose 256-block does not divide a row "]
        lines[-1] += "falls back to Q8_0 / Q4_0; small and 1-D tensors stay F32):"
        lines += ["", "| row | tensors | written by |", "|---|---|---|"]
        lines += [
            f"| {r['name']} | {_types(r['transformer_types'])} | {r.get('quantizer') or '–'}"
            + (f", imatrix {r['imatrix']}" if r.get("imatrix") else "")
            + " |"
            for r in typed
        ]
    from zimage_lite.bench.calibrated import markdown_lines

    lines += markdown_lines(rows, s.get("imatrix"))
    lines += ["", "![images per row](grid.png)", "", "![quality vs time](plot.png)", "", "## Environment", ""]
    lines += _environment(env, s, report["created_utc"])
    lines += ["", "## Prompts", ""]
    lines += [f"- `{p['id']}` ({p['kind']}): {p['text']}" for p in s["prompts"]]
    return "\n".join(lines) + "\n"
