"""Kernel microbenchmarks on one CUDA GPU: Triton dequant bandwidth and three ways to do y = x @ W^T.

For every real layer shape (Z-Image DiT and Qwen3-4B) and M (tokens) it reports, side by side:
- dequant: GB/s of the Triton dequant kernel (raw bytes read + bf16 bytes written), also as a fraction
  of the measured device-to-device copy bandwidth;
- fused: TFLOPS of the Triton fused dequant-matmul (bf16 operands, fp32 accumulation);
- deq+cuBLAS: TFLOPS of Triton dequant into a bf16 buffer followed by F.linear;
- bf16 cuBLAS: TFLOPS of F.linear on an already-dense bf16 weight (the reference speed).
Times are medians of CUDA-event timings; L2 is flushed before every timed call so weights come from
DRAM as they do in real inference. Weights are random valid blocks (speed does not depend on values);
each config also records the max relative difference between fused and deq+cuBLAS as a sanity check.

Run: `python benchmarks/kernel_speed.py [--qtypes Q8_0 Q4_K] [--m 1 16 64] [--out benchmarks/results/...]`
(default output benchmarks/results/kernel-speed-<gpu>.json). `--dry-run` exercises the code on the CPU
with tiny shapes and the torch backend (add TRITON_INTERPRET=1 to run the Triton paths interpreted);
its numbers mean nothing. Without CUDA and without --dry-run the script exits with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# name -> (in_features K, out_features N)
SHAPES = {
    "dit.qkv": (3840, 11520),
    "dit.out": (3840, 3840),
    "dit.w1/w3": (3840, 10240),
    "dit.w2": (10240, 3840),
    "qwen.q": (2560, 4096),
    "qwen.k/v": (2560, 1024),
    "qwen.gate/up": (2560, 9728),
    "qwen.down": (9728, 2560),
}
M_VALUES = [1, 16, 64, 256, 1024, 4096, 4608]
QTYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "FP8_E4M3"]
# (bytes per block, offsets of fp16 fields) — ggml-common.h layouts, to write sane scales
BLOCKS = {"Q8_0": (32, 34, [0]), "Q4_0": (32, 18, [0]), "Q4_K": (256, 144, [0, 2]),
          "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208])}  # fmt: skip
FLUSH_BYTES = 256 << 20


def random_weight(qtype: str, n: int, k: int, device: torch.device):
    """(data, scale) of a random valid (n, k) weight: random quant bytes, fp16 scales ~1e-3."""
    if qtype == "FP8_E4M3":
        w = torch.randn(n, k, device=device) * 100
        return w.clamp(-448, 448).to(torch.float8_e4m3fn), torch.tensor(1e-4, device=device)
    qk, ts, f16_offsets = BLOCKS[qtype]
    blocks = torch.randint(0, 256, (n * k // qk, ts), dtype=torch.uint8, device=device)
    for off in f16_offsets:
        d = (torch.rand(blocks.shape[0], device=device) * 1e-3).to(torch.float16)
        blocks[:, off : off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1), None


class Clock:
    """Median seconds of fn(): CUDA events on a GPU (L2 flushed before each call), perf_counter on CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.flush = torch.empty(
            FLUSH_BYTES if device.type == "cuda" else 1, dtype=torch.uint8, device=device
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type != "cuda":
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def copy_bandwidth(clock: Clock, device: torch.device, n_bytes: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / clock(lambda: dst.copy_(src)) / 1e9


def activation_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def bench_shape(name, k, n, qtypes, m_values, clock, device, backend, fused_max_m) -> list[dict]:
    from zimage_lite.kernels import dispatch

    rows = []
    act_dtype = activation_dtype(device)
    dense = torch.randn(n, k, device=device).to(act_dtype)
    cublas = {}
    for m in m_values:
        x = torch.randn(m, k, device=device, dtype=act_dtype)
        cublas[m] = clock(lambda x=x, dense=dense: F.linear(x, dense))
    del dense
    for qtype in qtypes:
        data, scale = random_weight(qtype, n, k, device)
        weight = dispatch.QuantWeight(data, qtype, (n, k), scale)
        scratch = torch.empty(n, k, dtype=act_dtype, device=device)

        def dequant(weight=weight, scratch=scratch):
            w = weight
            return dispatch.dequantize(
                w.data, w.qtype, w.shape, act_dtype, backend, out=scratch, scale=w.scale
            )

        t_deq = clock(dequant)
        moved = data.numel() * data.element_size() + scratch.numel() * scratch.element_size()
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=act_dtype)
            flops = 2 * m * n * k
            t_two = clock(lambda x=x, dequant=dequant: F.linear(x, dequant()))
            row = {
                "shape": name, "K": k, "N": n, "qtype": qtype, "M": m,
                "dequant_s": t_deq, "dequant_GBps": moved / t_deq / 1e9,
                "deq_cublas_s": t_two, "deq_cublas_TFLOPS": flops / t_two / 1e12,
                "bf16_cublas_s": cublas[m], "bf16_cublas_TFLOPS": flops / cublas[m] / 1e12,
                "fused_s": None, "fused_TFLOPS": None, "fused_max_rel_diff": None,
            }  # fmt: skip
            if backend == "triton" and m <= fused_max_m:
                from zimage_lite.kernels.matmul_triton import fused_matmul

                fused = lambda x=x, w=weight: fused_matmul(x, w.data, w.qtype, w.shape[0], None, w.scale)
                t_fused = clock(fused)
                ref = F.linear(x, dequant()).float()
                diff = (fused().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                row.update(
                    fused_s=t_fused, fused_TFLOPS=flops / t_fused / 1e12, fused_max_rel_diff=diff.item()
                )
            rows.append(row)
        del data, scratch, weight
    return rows


def print_table(rows: list[dict], copy_gbps: float) -> None:
    head = f"{'shape':14} {'qtype':9} {'M':>5} {'deq GB/s':>9} {'%copy':>6} {'fused':>8} {'deq+cuBLAS':>10} {'bf16':>8}  TFLOPS"
    print(head)
    print("-" * len(head))
    for r in rows:
        fused = "-" if r["fused_TFLOPS"] is None else f"{r['fused_TFLOPS']:.2f}"
        print(
            f"{r['shape']:14} {r['qtype']:9} {r['M']:>5} {r['dequant_GBps']:>9.1f} "
            f"{100 * r['dequant_GBps'] / copy_gbps:>5.0f}% {fused:>8} {r['deq_cublas_TFLOPS']:>10.2f} "
            f"{r['bf16_cublas_TFLOPS']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtypes", nargs="+", default=QTYPES, choices=QTYPES)
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES, help="token counts")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fused-max-m", type=int, default=1024, help="largest M to time the fused kernel at")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernel-speed-<gpu>.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, torch backend")
    args = ap.parse_args(argv)

    if args.dry_run:
        # torch backend; with TRITON_INTERPRET=1 in the environment the Triton paths run interpreted
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        device, backend, gpu = torch.device("cpu"), "triton" if interpreted else "torch", "cpu-dry-run"
        shapes = {name: (max(256, k // 40 // 256 * 256), max(8, n // 160)) for name, (k, n) in SHAPES.items()}
        m_values, args.repeats, args.warmup = [m for m in args.m if m <= 64] or [1], 2, 1
        copy_bytes = 1 << 20
    else:
        if not torch.cuda.is_available():
            print(
                "benchmarks/kernel_speed.py needs a CUDA GPU (none found); --dry-run runs it on the CPU",
                file=sys.stderr,
            )
            return 2
        from zimage_lite.kernels.dispatch import triton_usable

        device = torch.device("cuda")
        backend = "triton" if triton_usable(device) else "torch"
        gpu = torch.cuda.get_device_name(device)
        shapes, m_values, copy_bytes = SHAPES, args.m, 1 << 30
    clock = Clock(device, args.repeats, args.warmup)
    copy_gbps = copy_bandwidth(clock, device, copy_bytes)
    print(f"{gpu}: device copy {copy_gbps:.0f} GB/s, backend {backend}, medians of {args.repeats}")
    rows = []
    for name in args.shapes:
        k, n = shapes[name]
        rows += bench_shape(name, k, n, args.qtypes, m_values, clock, device, backend, args.fused_max_m)
    print_table(rows, copy_gbps)
    out = args.out
    if out is None and not args.dry_run:
        out = (
            Path("benchmarks/results")
            / f"kernel-speed-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "backend": backend,
                "activation_dtype": str(activation_dtype(device)), "copy_GBps": copy_gbps,
                "repeats": args.repeats, "dry_run": args.dry_run}  # fmt: skip
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
