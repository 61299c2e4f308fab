"""Kernel microbenchmarks on one CUDA GPU: Triton dequant bandwidth and every way to do y = x @ W^T.

For every real layer shape (Z-Image DiT and Qwen3-4B) and M (tokens) it reports, side by side:
- dequant: GB/s of the Triton dequant kernel (raw bytes read + bf16 bytes written), also as a fraction
  of the measured device-to-device copy bandwidth (read + written);
- each path of zimage_lite.kernels.dispatch that can run (`dequant` = Triton dequant + cuBLAS, `gemv` =
  the small-M kernel for M <= 16): seconds, TFLOPS and relative RMS error against the float32 product;
  for gemv also the weight bytes read per second, as a fraction of the copy bandwidth;
- fp8_native (FP8 rows, sm >= 8.9): torch._scaled_mm with per-token activation scales, with its error
  beside the dequant path's;
- bf16 cuBLAS: TFLOPS of F.linear on an already-dense bf16 weight (the reference speed);
- fastest_path: what the path chooser (kernels/choice.py) would pick from these timings.
Times are medians of CUDA-event timings; L2 is flushed before every timed call so weights come from
DRAM as they do in real inference. Weights are random valid blocks (speed does not depend on values).

Run (GPU, about 2 minutes for this selection):
  python benchmarks/kernel_speed.py --shapes dit.qkv dit.w2 qwen.q qwen.down --m 1 4 16 64 4096 --repeats 10
(all shapes, types and M by default; output benchmarks/results/kernel-speed-<gpu>.json). `--dry-run`
exercises the code on the CPU with tiny shapes and the torch backend (add TRITON_INTERPRET=1 to run
the Triton paths interpreted); its numbers mean nothing. Without CUDA and without --dry-run the script
exits with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
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
    """Median seconds of fn(): the path chooser's own timer (CUDA events, L2 flushed before each call;
    perf_counter on a CPU), so the benchmark and the dispatcher measure alike."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        from zimage_lite.kernels.choice import event_timer

        return event_timer(fn, self.device, self.repeats, self.warmup)


def copy_bandwidth(clock: Clock, device: torch.device, n_bytes: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / clock(lambda: dst.copy_(src)) / 1e9


def activation_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error of y against a float32 reference."""
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_products(x, weight, dequant, clock, device, backend) -> dict:
    """Seconds, TFLOPS and quality of every way to compute x @ W^T that can run here."""
    from zimage_lite.kernels import dispatch
    from zimage_lite.kernels.fp8_matmul import fp8_linear, scaled_mm_usable

    m, k = x.shape
    n = weight.shape[0]
    flops = 2 * m * n * k
    ref = x.float() @ dispatch.dequantize(weight.data, weight.qtype, weight.shape, scale=weight.scale).T
    row = {}
    paths = dispatch.candidate_paths(m, weight.qtype, device, backend)
    for path in paths:
        if path == "torch":
            continue
        run = lambda x=x, path=path: dispatch.quant_matmul(x, weight, backend=backend, path=path)  # noqa: E731
        seconds = clock(run)
        row[f"{path}_s"], row[f"{path}_TFLOPS"] = seconds, flops / seconds / 1e12
        row[f"{path}_rel_err"] = rel_err(run(), ref)
    if weight.qtype == "FP8_E4M3" and scaled_mm_usable(device, n, k):
        native = lambda x=x: fp8_linear(x, weight.data, weight.scale)  # noqa: E731
        seconds = clock(native)
        row.update(fp8_native_s=seconds, fp8_native_TFLOPS=flops / seconds / 1e12)
        row["fp8_native_rel_err"] = rel_err(native(), ref)
    timed = {p: row[f"{p}_s"] for p in paths if f"{p}_s" in row}
    row["fastest_path"] = min(timed, key=timed.get) if timed else "torch"
    return row


def bench_shape(name, k, n, qtypes, m_values, clock, device, backend) -> list[dict]:
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
            row = {
                "shape": name, "K": k, "N": n, "qtype": qtype, "M": m,
                "weight_bytes": data.numel() * data.element_size(),
                "dequant_only_s": t_deq, "dequant_GBps": moved / t_deq / 1e9,
                "bf16_cublas_s": cublas[m], "bf16_cublas_TFLOPS": flops / cublas[m] / 1e12,
            }  # fmt: skip
            row.update(time_products(x, weight, dequant, clock, device, backend))
            rows.append(row)
        del data, scratch, weight
    return rows


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    return "-" if row.get(key) is None else fmt.format(row[key])


def print_table(rows: list[dict], copy_gbps: float) -> None:
    head = (
        f"{'shape':14} {'qtype':9} {'M':>5} {'deq GB/s':>9} {'%copy':>6} {'gemv':>8} {'gemv %copy':>10} "
        f"{'deq+cuBLAS':>10} {'fp8 native':>10} {'bf16':>8}  TFLOPS  fastest  rel.err dequant / fp8 native"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        gemv_pct = (
            None if r.get("gemv_s") is None else 100 * r["weight_bytes"] / r["gemv_s"] / 1e9 / copy_gbps
        )
        print(
            f"{r['shape']:14} {r['qtype']:9} {r['M']:>5} {r['dequant_GBps']:>9.1f} "
            f"{100 * r['dequant_GBps'] / copy_gbps:>5.0f}% {_cell(r, 'gemv_TFLOPS'):>8} "
            f"{'-' if gemv_pct is None else f'{gemv_pct:.0f}%':>10} {_cell(r, 'dequant_TFLOPS'):>10} "
            f"{_cell(r, 'fp8_native_TFLOPS'):>10} {r['bf16_cublas_TFLOPS']:>8.2f}  {r['fastest_path']:>15}  "
            f"{_cell(r, 'dequant_rel_err', '{:.1e}')} / {_cell(r, 'fp8_native_rel_err', '{:.1e}')}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtypes", nargs="+", default=QTYPES, choices=QTYPES)
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES, help="token counts")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernel-speed-<gpu>.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, torch backend")
    args = ap.parse_args(argv)

    if args.dry_run:
        # torch backend; with TRITON_INTERPRET=1 in the environment the Triton paths run interpreted
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        device, backend, gpu = torch.device("cpu"), "triton" if interpreted else "torch", "cpu-dry-run"
        shapes = {name: (max(256, k // 40 // 256 * 256), max(8, n // 160)) for name, (k, n) in SHAPES.items()}
        m_values, args.repeats, args.warmup = [m for m in args.m if m <= 64] or [1], 1, 1
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
        rows += bench_shape(name, k, n, args.qtypes, m_values, clock, device, backend)
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
