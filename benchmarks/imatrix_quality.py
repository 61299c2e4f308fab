"""What an importance matrix and per-tensor recipes buy: image PSNR against the float32 model, per variant.

Steps: (1) a source model: `--model` (real Z-Image-Turbo weights, a diffusers folder) or, without it, the
synthetic `small-k` model with outlier input channels (`zimage-lite synthetic --size small-k --outliers`;
plain random weights have no outlier channels and hide the effect); (2) an imatrix gathered by running it
on the built-in calibration prompts (`zimage-lite imatrix`), or `--imatrix FILE`; (3) conversions: each
preset plain and with the imatrix, `--target-size` at the q4_k_m+imatrix files' size, and q4_k_m+imatrix
with the refiners kept in BF16 (`--tensor-type-rules`) beside a target-size recipe of that size; (4) every
variant generates the benchmark's held-out prompts (not the calibration ones) and is compared with the
float32 source: PSNR of the decoded images (mean over prompts x seeds) and the latents' relative error.
GGUF bytes are the transformer and text-encoder files.

Synthetic (a minute or two on 2 cores):  python benchmarks/imatrix_quality.py
Real weights (one command; a GPU for the generations, the CPU converts):
  python benchmarks/imatrix_quality.py --model /path/to/Z-Image-Turbo --width 1024 --height 1024 \
      --steps 8 --prompts 5 --device cuda --out benchmarks/results/imatrix-real.json
Only real weights settle the final recipe; the synthetic numbers show the machinery works and its size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

PRESETS = ("q4_k", "q4_k_m", "q3_k", "q3_k_m", "q4_0")
REFINERS_BF16 = r"(^|\.)(noise_refiner|context_refiner)\.=bf16"


def gguf_bytes(folder: Path) -> int:
    return sum((folder / f"{c}.gguf").stat().st_size for c in ("transformer", "text_encoder"))


def generate_all(folder: Path, args, prompts) -> list[tuple]:
    import torch

    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(folder, device=args.device, dtype=args.dtype)
    out = []
    for p in prompts:
        for seed in range(args.seeds):
            latents = pipe.generate_latents(
                p.text, seed=seed, steps=args.steps, width=args.width, height=args.height
            )
            out.append((latents.float().cpu(), pipe.decode(latents)[0]))
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def compare(images: list[tuple], reference: list[tuple]) -> dict:
    from zimage_lite.bench.metrics import latent_relative_error, psnr

    psnrs = [psnr(img, ref_img) for (_, img), (_, ref_img) in zip(images, reference)]
    lat = [latent_relative_error(lat, ref_lat) for (lat, _), (ref_lat, _) in zip(images, reference)]
    return {
        "psnr_db_mean": statistics.mean(psnrs),
        "psnr_db_min": min(psnrs),
        "latent_rel_err": statistics.mean(lat),
    }


def variants(imatrix: Path, presets: list[str]) -> list[tuple[str, dict]]:
    """(name, convert kwargs) in the order they run; sizes of earlier ones feed later targets."""
    from zimage_lite.convert.recipe import RecipeOptions

    rows = []
    for preset in presets:
        rows.append((preset, {"quant": preset, "options": RecipeOptions()}))
        rows.append((f"{preset}+imatrix", {"quant": preset, "options": RecipeOptions(imatrix=imatrix)}))
    if "q4_k_m" in presets:
        refiners = RecipeOptions(imatrix=imatrix, rules=REFINERS_BF16)
        rows.append(("q4_k_m+imatrix, refiners bf16", {"quant": "q4_k_m", "options": refiners}))
    return rows


def run(args) -> dict:
    from zimage_lite.bench.prompts import PROMPTS
    from zimage_lite.convert.converter import convert
    from zimage_lite.convert.recipe import RecipeOptions
    from zimage_lite.pipeline import Pipeline
    from zimage_lite.quant.imatrix import CALIBRATION_PROMPTS, collect
    from zimage_lite.weights.imatrix_io import write_imatrix

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.model) if args.model else work / "source"
    if not args.model and not source.exists():
        from zimage_lite.synthetic import write_synthetic_model

        write_synthetic_model(source, "small-k", seed=args.seed, outliers=not args.no_outliers)
    imatrix = Path(args.imatrix) if args.imatrix else work / "imatrix.gguf"
    t0 = time.perf_counter()
    if not args.imatrix:
        pipe = Pipeline.load(source, device=args.device, dtype=args.dtype)
        im = collect(pipe, CALIBRATION_PROMPTS, steps=args.steps, width=args.width, height=args.height,
                     dataset="zimage-lite built-in calibration prompts")  # fmt: skip
        write_imatrix(im, imatrix)
        del pipe
    imatrix_s = time.perf_counter() - t0
    prompts = PROMPTS[: args.prompts]
    reference = generate_all(source, args, prompts)
    rows, sizes = [], {}

    def measure(name: str, quant, options) -> None:
        folder = work / name.replace(" ", "").replace(",", "_").replace("+", "_")
        t = time.perf_counter()
        convert(source, folder, quant, force=True, progress=False, options=options)
        convert_s = time.perf_counter() - t
        sizes[name] = gguf_bytes(folder)
        row = {"name": name, "gguf_bytes": sizes[name], "convert_s": round(convert_s, 1),
               **compare(generate_all(folder, args, prompts), reference)}  # fmt: skip
        rows.append(row)
        print(
            f"{name:<40} {sizes[name] / 1e6:8.2f} MB  {row['psnr_db_mean']:6.2f} dB  {row['latent_rel_err']:.4f}"
        )

    for name, kw in variants(imatrix, args.presets.split(",")):
        measure(name, kw["quant"], kw["options"])
    if not args.no_recipes:  # needs the q4_k_m and q3_k_m rows' sizes
        for base in ("q4_k_m+imatrix", "q4_k_m+imatrix, refiners bf16", "q3_k_m+imatrix"):
            options = RecipeOptions(imatrix=imatrix, target_size=sizes[base])
            measure(f"target {base} size +imatrix", None, options)
        options = RecipeOptions(target_size=sizes["q4_k_m+imatrix"])
        measure("target q4_k_m+imatrix size, no imatrix", None, options)
    return {
        "source": str(args.model or f"synthetic small-k, outliers={not args.no_outliers}"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "imatrix_s": round(imatrix_s, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Z-Image-Turbo diffusers folder (default: a synthetic model)")
    p.add_argument("--imatrix", help="use this imatrix instead of gathering one")
    p.add_argument("--work", default="/tmp/zimage-imatrix-quality")
    p.add_argument("--out", default="benchmarks/results/imatrix-quality-cpu.json")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=5, help="the first N benchmark prompts (held out)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="synthetic model seed")
    p.add_argument("--no-outliers", action="store_true", help="synthetic model without outlier channels")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list (default: all)")
    p.add_argument("--no-recipes", action="store_true", help="skip the target-size rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".part")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
