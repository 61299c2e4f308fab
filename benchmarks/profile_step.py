"""Where one denoising step's time goes: torch.profiler around generations, grouped by kind of kernel.

For each mode (resident: the whole model on the device; streamed: weights on the host, streamed per
block within `--vram`) the pipeline is loaded once, warmed up with a two-step generation, then a
three-step generation runs with the profiler switched on by the pipeline's step callback after step 1
and off after step 2 (the callback runs after the pipeline has synchronised the device), so the
profile holds one middle denoising step and nothing else. Time is device kernel time on CUDA (summed over
streams: copies on the side stream overlap compute, so the sum can exceed the step's wall time, which is
reported separately) or CPU op self time with --device cpu. Kernels are grouped by name into
matmul / dequant / attention / norms+RoPE / copies / other (CATEGORIES, first match wins); the top
kernels are listed with their group so a misfiled one shows.

The SDPA question (does a boolean key mask keep attention off the flash kernel?): the attention kernel
names in the profile say which backend ran (flash_fwd: FlashAttention; fmha_cutlass / efficient:
memory-efficient; cudnn: cuDNN), and on CUDA `sdpa_flash_probe` asks the flash backend directly, with
and without a mask, at the step's sequence length.

Run on a GPU (writes the full-size synthetic model into the bench cache once, then ~2-4 minutes):
  python benchmarks/profile_step.py --size full --precision q8_0 --modes resident streamed --vram 6GB
CPU dry run (seconds): python benchmarks/profile_step.py --size tiny --device cpu
Writes <out>.json and <out>.md (default benchmarks/results/profile-step-<device>-<precision>).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

CATEGORIES = (
    ("copies", r"memcpy|memset|copy|catarraybatched|aten::(to|_to_copy|cat|contiguous|clone)$"),
    ("dequant", r"dequant"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|xmma|cublas|scaled_mm|splitk|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norms+RoPE", r"norm|rsqrt|pow|mean|reduce|complex|polar|view_as_real"),
)
GROUPS = [name for name, _ in CATEGORIES] + ["other"]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def category(kernel: str) -> str:
    """The group of a kernel (CUDA) or op (CPU) name."""
    name = kernel.lower()
    for group, pattern in CATEGORIES:
        if re.search(pattern, name):
            return group
    return "other"


def kernel_seconds(prof, device: torch.device) -> dict[str, float]:
    """{kernel or op name: seconds} of a finished profile: device kernels on CUDA, aten ops' self time
    on the CPU (self time, so a parent op never counts its children again)."""
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        out[e.name] = out.get(e.name, 0.0) + us / 1e6
    return out


def profile_one_step(pipe, size: int, device: torch.device) -> tuple[dict[str, float], float]:
    """(kernel seconds, wall seconds) of the second of three denoising steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    running = []  # [True] while the profiler records

    def on_step(i: int, steps: int) -> None:
        if i == 0:
            prof.start()
            running.append(True)
        elif i == 1:
            prof.stop()
            running.clear()

    try:
        pipe.generate_latents(PROMPT, seed=0, steps=3, width=size, height=size, on_step=on_step)
    finally:
        if running:  # an error inside the profiled step
            prof.stop()
    return kernel_seconds(prof, device), pipe.last_stats.steps[1]


def summarize(step: dict[str, float], wall_s: float) -> dict:
    groups = dict.fromkeys(GROUPS, 0.0)
    for name, seconds in step.items():
        groups[category(name)] += seconds
    top = sorted(step.items(), key=lambda kv: -kv[1])[:25]
    return {
        "step_wall_s": wall_s,
        "kernel_s": sum(groups.values()),
        "groups_s": groups,
        "top_kernels": [{"name": n[:200], "s": s, "group": category(n)} for n, s in top],
        "attention_kernels": sorted(n[:200] for n, s in step.items() if category(n) == "attention" and s > 0),
    }


def sdpa_flash_probe(device: torch.device, dtype: torch.dtype, tokens: int, heads: int = 30) -> dict:
    """Does the flash SDPA backend accept this attention with no mask / with a boolean key mask?"""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, tokens, 128, device=device, dtype=dtype)
    answers = {}
    for label, mask in (
        ("no_mask", None),
        ("bool_key_mask", torch.ones(1, 1, 1, tokens, device=device, dtype=torch.bool)),
    ):
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, q, q, mask)
            answers[label] = "flash runs"
        except RuntimeError as exc:
            answers[label] = f"flash refused: {str(exc).splitlines()[0][:200]}"
    return answers


def profile_mode(folder: Path, mode: str, args, device: torch.device) -> dict:
    from zimage_lite.pipeline import Pipeline

    vram = args.vram if mode == "streamed" else None
    pipe = Pipeline.load(folder, device=str(device), vram=vram)
    pipe.generate_latents(PROMPT, seed=0, steps=2, width=args.resolution, height=args.resolution)  # warm-up
    step, wall_s = profile_one_step(pipe, args.resolution, device)
    result = summarize(step, wall_s)
    result.update(vram=vram, dtype=str(pipe.dtype).removeprefix("torch."))
    del pipe
    return result


def markdown(report: dict) -> str:
    modes = list(report["modes"])
    lines = [
        f"# One denoising step: {report['meta']['what']}",
        "",
        "| group | " + " | ".join(f"{m} ms | {m} %" for m in modes) + " |",
        "|---|" + "---:|---:|" * len(modes),
    ]
    for group in GROUPS:
        cells = []
        for m in modes:
            r = report["modes"][m]
            s = r["groups_s"][group]
            cells += [f"{1e3 * s:.2f}", f"{100 * s / r['kernel_s']:.0f}" if r["kernel_s"] > 0 else "-"]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append(
        "| kernel time (sum) | "
        + " | ".join(f"{1e3 * report['modes'][m]['kernel_s']:.2f} | " for m in modes)
        + " |"
    )
    lines.append(
        "| step wall time | "
        + " | ".join(f"{1e3 * report['modes'][m]['step_wall_s']:.2f} | " for m in modes)
        + " |"
    )
    for m in modes:
        names = report["modes"][m]["attention_kernels"] or ["(none)"]
        lines += ["", f"Attention kernels ({m}): " + "; ".join(f"`{n[:80]}`" for n in names)]
    if report.get("sdpa_flash_probe"):
        lines += ["", "Flash SDPA probe: " + json.dumps(report["sdpa_flash_probe"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small", "full"), default="full", help="synthetic model size")
    ap.add_argument("--model", type=Path, help="a real model folder instead of a synthetic one")
    ap.add_argument("--precision", default="bf16", help="bf16 (the folder itself) or a converter preset")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--modes", nargs="+", choices=("resident", "streamed"), default=["resident", "streamed"])
    ap.add_argument("--vram", default="6GB", help="budget of the streamed mode")
    ap.add_argument("--resolution", type=int, help="width = height (default 1024; 64 for --size tiny)")
    ap.add_argument("--cache", type=Path, help="bench cache folder (synthetic and converted models)")
    ap.add_argument("--out", type=Path, help="output path without suffix")
    args = ap.parse_args(argv)

    from zimage_lite.bench import sources
    from zimage_lite.pipeline import resolve_device

    device = resolve_device(args.device)
    args.resolution = args.resolution or (64 if args.size == "tiny" else 1024)
    cache = args.cache or sources.default_cache_dir()
    reference = args.model or sources.synthetic_model(args.size, cache)
    folder, _ = sources.precision_source(reference, args.precision, cache, progress=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = f"{args.model or 'synthetic ' + args.size} model, {args.precision}, {args.resolution}x{args.resolution}, {name}"
    report = {
        "meta": {
            "what": what,
            "device": name,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "modes": {mode: profile_mode(folder, mode, args, device) for mode in args.modes},
    }
    if device.type == "cuda":
        tokens = (args.resolution // 16) ** 2 + 32  # image tokens + one 32-token caption
        report["sdpa_flash_probe"] = sdpa_flash_probe(device, torch.bfloat16, tokens)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = args.out or Path("benchmarks/results") / f"profile-step-{slug}-{args.precision}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
