"""Seconds for one generation on the tiny synthetic model: zimage-lite vs diffusers' ZImagePipeline.

Both pipelines run the same model, prompt, seed and size in one process, alternating ours/theirs each
repeat so machine noise hits both alike; we report medians and the ratio. Load time is measured once
each. Run: `python benchmarks/generate_overhead.py [--repeats 7] [--out benchmarks/results/...json]`.
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
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from diffusers import ZImagePipeline

    from zimage_lite.pipeline import Pipeline
    from zimage_lite.synthetic import write_synthetic_model

    prompt, seed = "a lighthouse on a cliff at dusk", 42
    with tempfile.TemporaryDirectory() as tmp:
        model = write_synthetic_model(Path(tmp) / "tiny", "tiny")
        t = time.perf_counter()
        ours = Pipeline.load(model, device="cpu", dtype="float32")
        load_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = ZImagePipeline.from_pretrained(str(model), torch_dtype=torch.float32)
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

        run_ours(), run_ref()  # warm-up (allocator, first-call paths)
        times: dict[str, list[float]] = {"zimage_lite": [], "diffusers": []}
        for _ in range(args.repeats):
            for name, fn in (("zimage_lite", run_ours), ("diffusers", run_ref)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": f"tiny synthetic model, {args.size}x{args.size}, {args.steps} steps, float32, CPU",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "median_s": med,
        "ratio_ours_over_diffusers": med["zimage_lite"] / med["diffusers"],
        "load_s": {"zimage_lite": load_ours, "diffusers": load_ref},
        "all_s": times,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
