"""Seconds for one generation on the tiny synthetic model: zimage-lite vs diffusers' ZImagePipeline.

Both pipelines run the same model, prompt, seed and size in one process, alternating ours/theirs each
repeat so machine noise hits both alike; we report medians and the ratio. Load time is measured once
each. Run: `python benchmarks/generate_overhead.py [--repeats 7] [--dtype float32] [--model-size tiny]
[--no-diffusers] [--out benchmarks/results/...json]`. `benchmarks/overhead_before_after.py` runs it against
two checkouts (e.g. main and a branch), alternating, to show what a change costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=256, help="image width = height")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--model-size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--stress", choices=["fp16"], default=None, help="the fp16 stress model (ours only)")
    ap.add_argument("--no-diffusers", action="store_true", help="time zimage-lite only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    from diffusers import ZImagePipeline

    from zimage_lite.pipeline import Pipeline
    from zimage_lite.synthetic import write_synthetic_model

    prompt, seed = "a lighthouse on a cliff at dusk", 42
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"stress": args.stress} if args.stress else {}  # older checkouts have no stress option
        model = write_synthetic_model(Path(tmp) / args.model_size, args.model_size, **kw)
        t = time.perf_counter()
        ours = Pipeline.load(model, device="cpu", dtype=args.dtype)
        load_ours = time.perf_counter() - t
        ref, load_ref = None, None
        if not args.no_diffusers:
            t = time.perf_counter()
            ref = ZImagePipeline.from_pretrained(str(model), torch_dtype=dtype)
            ref.set_progress_bar_config(disable=True)
            load_ref = time.perf_counter() - t

        def run_ours():
            return ours.generate(prompt, seed=seed, steps=args.steps, width=args.size, height=args.size)

        def run_ref():
            gen = torch.Generator("cpu").manual_seed(seed)
            return ref(
                prompt, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=0.0,
                generator=gen,
            ).images  # fmt: skip

        runs = {"zimage_lite": run_ours} if ref is None else {"zimage_lite": run_ours, "diffusers": run_ref}
        for fn in runs.values():  # warm-up (allocator, first-call paths)
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": f"{args.model_size} synthetic model{' (stress fp16)' if args.stress else ''}, "
        f"{args.size}x{args.size}, {args.steps} steps, {args.dtype}, CPU",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "median_s": med,
        "ratio_ours_over_diffusers": med["zimage_lite"] / med["diffusers"] if "diffusers" in med else None,
        "load_s": {"zimage_lite": load_ours, "diffusers": load_ref},
        "all_s": times,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
