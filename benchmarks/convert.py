"""Converter throughput (GB of FP32 input per second) and peak RSS, ours vs gguf-py, on the same tensors.

Medium mode (default): a safetensors file of `--matrices` FP32 matrices of `--rows` x `--cols` (the real
FFN shape 10240 x 3840 by default), converted to every format by our streaming converter, and to Q8_0 /
Q4_0 / BF16 by gguf-py's numpy quantizer (`gguf.quants.quantize`) written tensor by tensor with its
GGUFWriter, i.e. the ComfyUI-GGUF convert.py recipe minus holding the whole model. Every run is its own
subprocess, so its peak RSS (VmHWM: anonymous memory plus mapped file pages) is its own. The input sits
in the page cache for all runs alike; ours and gguf-py runs alternate, each after an `os.sync()`, and
medians of `--repeats` are reported.

`--full`: write a synthetic full-size FP32 Z-Image transformer (24.6 GB, streamed to disk) and convert it
with `zimage_lite.convert.converter.convert` to each of `--full-quant` (comma-separated, default q8_0,q4_k),
reporting time and peak RSS. On a 24 GB machine the input does not fit the page cache, so part of it is
read from disk.

Run: `python benchmarks/convert.py [--full] [--out benchmarks/results/convert-cpu.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "FP8_E4M3")
GGUF_PY = ("Q8_0", "Q4_0", "BF16")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), falling back to getrusage where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_medium_input(path: Path, matrices: int, rows: int, cols: int) -> None:
    import torch

    from zimage_lite.weights.safetensors_writer import SafetensorsStreamWriter

    writer = SafetensorsStreamWriter(path)
    names = [f"blocks.{i}.w.weight" for i in range(matrices)]
    for name in names:
        writer.add(name, (rows, cols), torch.float32)
    writer.begin()
    gen = torch.Generator().manual_seed(0)
    for name in names:
        writer.write(name, torch.randn(rows, cols, generator=gen) * 0.02)
    writer.close()


# -- workers (run in subprocesses) ------------------------------------------------------------------------
def worker_ours(src: Path, out: Path, qtype: str, threads: int | None) -> dict:
    from zimage_lite.convert.converter import write_plan
    from zimage_lite.convert.plan import ComponentPlan, _job
    from zimage_lite.weights.checkpoint import open_checkpoint

    source = open_checkpoint(src)
    jobs = [_job(source, k, (k,), source.shape(k), qtype, "") for k in source.keys()]
    container = "safetensors" if qtype == "FP8_E4M3" else "gguf"
    plan = ComponentPlan("bench", container, jobs, "lumina2" if container == "gguf" else None, {})
    start = time.perf_counter()
    out_bytes = write_plan(plan, out, threads, progress=False)
    return {
        "seconds": time.perf_counter() - start,
        "in_bytes": sum(j.in_bytes for j in jobs),
        "out_bytes": out_bytes,
    }


def worker_gguf_py(src: Path, out: Path, qtype: str) -> dict:
    import gguf
    import numpy as np
    from safetensors import safe_open

    ggml = gguf.GGMLQuantizationType[qtype]
    start = time.perf_counter()
    writer = gguf.GGUFWriter(str(out), arch="lumina2")
    with safe_open(str(src), "np") as f:
        keys = list(f.keys())
        in_bytes = 0
        for k in keys:  # declare first, then quantize and write one tensor at a time
            shape = f.get_slice(k).get_shape()
            block, size = gguf.GGML_QUANT_SIZES[ggml]
            nbytes = int(np.prod(shape)) // block * size
            writer.add_tensor_info(
                k, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes, raw_dtype=ggml
            )
            in_bytes += int(np.prod(shape)) * 4
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for k in keys:
            writer.write_tensor_data(gguf.quants.quantize(f.get_tensor(k), ggml))
    writer.close()
    return {"seconds": time.perf_counter() - start, "in_bytes": in_bytes, "out_bytes": out.stat().st_size}


def write_full_input(path: Path) -> dict:
    """A full-size FP32 Z-Image transformer (ComfyUI names), written one tensor at a time."""
    import torch

    from zimage_lite.config import DiTConfig
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.synthetic import random_tensor
    from zimage_lite.weights.load import build_meta
    from zimage_lite.weights.safetensors_writer import SafetensorsStreamWriter

    shapes = {k: tuple(v.shape) for k, v in build_meta(lambda: ZImageDiT(DiTConfig())).state_dict().items()}
    writer = SafetensorsStreamWriter(path)
    for name, shape in shapes.items():
        writer.add(name, shape, torch.float32)
    writer.begin()
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for name, shape in shapes.items():
        writer.write(name, random_tensor(name, shape, gen, torch.float32))
    writer.close()
    return {"seconds": time.perf_counter() - start, "bytes": path.stat().st_size, "tensors": len(shapes)}


def worker_full(src: Path, out: Path, quant: str, threads: int | None) -> dict:
    from zimage_lite.convert.converter import convert

    quant, _, variant = quant.partition(":")
    if variant == "no-prefetch":  # the A/B of --full-prefetch-ab: no read-ahead hints to the kernel
        import zimage_lite.convert.stream as stream

        stream._prefetch = lambda job: None

    r = convert(src, out, quant, force=True, progress=True, threads=threads)
    return {"seconds": r.seconds, "in_bytes": r.in_bytes, "out_bytes": r.out_bytes, "types": r.types}


def _worker_main(args: argparse.Namespace) -> None:
    threads = args.threads or None
    if args.worker == "ours":
        result = worker_ours(args.src, args.dst, args.qtype, threads)
    elif args.worker == "gguf-py":
        result = worker_gguf_py(args.src, args.dst, args.qtype)
    elif args.worker == "full-write":
        result = write_full_input(args.dst)
    else:
        result = worker_full(args.src, args.dst, args.qtype, threads)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


def _run(worker: str, src: Path, dst: Path, qtype: str, threads: int) -> dict:
    # Flush earlier runs' dirty pages first: otherwise a run can stall in the kernel's writeback
    # throttling for data another run wrote (seen as 4x spreads in BF16 times).
    if hasattr(os, "sync"):
        os.sync()
    cmd = [sys.executable, __file__, "--worker", worker, "--src", str(src), "--dst", str(dst), "--qtype", qtype,
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{worker} {qtype} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["gb_per_s"] = result["in_bytes"] / 1e9 / result["seconds"]
    if dst.exists():
        dst.unlink()
    return result


def _median(runs: list[dict]) -> dict:
    """The run with the median time (each its own process); all times kept, the largest peak RSS."""
    runs = sorted(runs, key=lambda r: r["seconds"])
    median = dict(runs[len(runs) // 2])
    median["all_seconds"] = [r["seconds"] for r in runs]
    median["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    return median


def _line(tool: str, qtype: str, r: dict) -> str:
    return (f"{tool:8} {qtype:9} {r['gb_per_s']:7.3f} GB/s  {r['seconds']:7.1f} s  "
            f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  out {r['out_bytes'] / 1e6:8.1f} MB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=2)
    ap.add_argument("--rows", type=int, default=10240)
    ap.add_argument("--cols", type=int, default=3840)
    ap.add_argument("--formats", default=",".join(OURS))
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and format; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="encoder threads (0: all cores)")
    ap.add_argument("--full", action="store_true", help="also convert a synthetic full-size FP32 transformer")
    ap.add_argument("--full-quant", default="q8_0,q4_k")
    ap.add_argument("--full-prefetch-ab", action="store_true", help="also run each without read-ahead hints")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--qtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker_main(args)
        return

    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "input": {"matrices": args.matrices, "shape": [args.rows, args.cols], "dtype": "float32"},
        "threads": args.threads or os.cpu_count(),
        "repeats": args.repeats,
        "ours": {},
        "gguf_py": {},
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        src = tmp / "medium.safetensors"
        write_medium_input(src, args.matrices, args.rows, args.cols)
        report["input"]["bytes"] = src.stat().st_size
        for qtype in formats:
            suffix = ".safetensors" if qtype == "FP8_E4M3" else ".gguf"
            reps = 1 if qtype in ("Q4_K", "Q5_K", "Q6_K") else args.repeats  # the K runs are long already
            tools = {"ours": tmp / f"ours{suffix}"}
            if qtype in GGUF_PY:
                tools["gguf-py"] = tmp / "theirs.gguf"
            runs: dict[str, list[dict]] = {tool: [] for tool in tools}
            for _ in range(reps):  # interleaved, so drift in the machine's load hits both tools alike
                for tool, dst in tools.items():
                    runs[tool].append(_run(tool, src, dst, qtype, args.threads))
            report["ours"][qtype] = r = _median(runs["ours"])
            print(_line("ours", qtype, r), flush=True)
            if "gguf-py" in runs:
                report["gguf_py"][qtype] = g = _median(runs["gguf-py"])
                print(_line("gguf-py", qtype, g), flush=True)
                r["speedup_vs_gguf_py"] = r["gb_per_s"] / g["gb_per_s"]
        src.unlink()
        if args.full:
            full_src = tmp / "z_image_fp32.safetensors"
            report["full_input"] = _run_keep("full-write", full_src)
            print(f"wrote full-size input: {report['full_input']['bytes'] / 1e9:.1f} GB", flush=True)
            report["full"] = {}
            for quant in [q.strip() for q in args.full_quant.split(",") if q.strip()]:
                out = tmp / ("z_image.safetensors" if quant == "fp8" else "z_image.gguf")
                for variant in [":no-prefetch", ""] if args.full_prefetch_ab else [""]:
                    name = quant + variant
                    report["full"][name] = r = _run("full", full_src, out, name, args.threads)
                    print(_line("full", name, r), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _run_keep(worker: str, dst: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--src", str(dst), "--dst", str(dst), "--qtype", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    main()
