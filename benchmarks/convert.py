"""Converter throughput (GB of input per second), CPU time and peak RSS: ggml's quantizers, our torch
fallback and gguf-py, on the same tensors, in one run.

Medium mode (default): a safetensors file of `--matrices` FP32 matrices of `--rows` x `--cols` (the real
FFN shape 10240 x 3840 by default), converted to every format by our streaming converter with ggml's
quantizers (`ggml`) and with the torch fallback (`torch`), and to Q8_0 / Q4_0 / BF16 by gguf-py's numpy
quantizer (`gguf.quants.quantize`) written tensor by tensor with its GGUFWriter, i.e. the ComfyUI-GGUF
convert.py recipe minus holding the whole model. `ggml-1t` is ggml's quantizer alone on one thread over
the same matrices already in memory: the reference for the converter's scaling (goal: ggml rows at least
0.9 x ggml-1t x threads). Every run is its own subprocess, so its peak RSS (VmHWM: anonymous memory plus
mapped file pages) and CPU seconds are its own. The input sits in the page cache for all runs alike;
the tools alternate, each run after an `os.sync()`, and medians of `--repeats` are reported (one run of
the torch K-quants, which are slow). On a loaded machine wall-clock scaling says little: the report
also gives GB per CPU second, which other processes do not dilute.

`--full`: convert a full-size Z-Image model folder (`--full-src`, e.g. written by `zimage-lite synthetic
DIR --size full --dtype bfloat16`: transformer 12.3 GB + text encoder 8.0 GB in BF16; without it one is
written to the work folder) with `zimage_lite.convert.converter.convert` to each of `--full-quant`,
reporting time, CPU time and peak RSS.

Run: `python benchmarks/convert.py [--full [--full-src DIR]] [--out benchmarks/results/convert-cpu.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "FP8_E4M3")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
def worker_ours(src: Path, out: Path, qtype: str, threads: int | None, quantizer: str) -> dict:
    from zimage_lite.convert.converter import write_plan
    from zimage_lite.convert.plan import ComponentPlan, _job
    from zimage_lite.weights.checkpoint import open_checkpoint

    source = open_checkpoint(src)
    jobs = [_job(source, k, (k,), source.shape(k), qtype, "") for k in source.keys()]
    container = "safetensors" if qtype == "FP8_E4M3" else "gguf"
    plan = ComponentPlan("bench", container, jobs, "lumina2" if container == "gguf" else None, {})
    start, cpu = time.perf_counter(), cpu_seconds()
    out_bytes = write_plan(plan, out, threads, progress=False, quantizer=quantizer)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - cpu,
        "in_bytes": sum(j.in_bytes for j in jobs),
        "out_bytes": out_bytes,
    }


def worker_ggml_single_thread(src: Path, qtype: str) -> dict:
    """ggml's quantizer alone, one thread, on float32 matrices already in memory (no I/O, no converter)."""
    import torch

    from zimage_lite.quant import formats, ggml_lib
    from zimage_lite.weights.checkpoint import open_checkpoint

    source = open_checkpoint(src)
    q = formats.QUANT_TYPES[qtype]
    matrices = [source.get(k).to(torch.float32).contiguous().reshape(-1) for k in source.keys()]
    outs = [torch.empty(m.numel() // q.block_size, q.type_size, dtype=torch.uint8) for m in matrices]
    start, cpu = time.perf_counter(), cpu_seconds()
    for m, o in zip(matrices, outs):
        ggml_lib.quantize_blocks(m, o, int(q.ggml_type), q.block_size)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - cpu,
        "in_bytes": sum(m.numel() * 4 for m in matrices),
        "out_bytes": sum(o.numel() for o in outs),
    }


def worker_gguf_py(src: Path, out: Path, qtype: str) -> dict:
    import gguf
    import numpy as np
    from safetensors import safe_open

    ggml = gguf.GGMLQuantizationType[qtype]
    start, cpu = time.perf_counter(), cpu_seconds()
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
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - cpu,
        "in_bytes": in_bytes,
        "out_bytes": out.stat().st_size,
    }


def write_full_input(path: Path) -> dict:
    """A full-size BF16 Z-Image model folder (diffusers layout), the real checkpoint's dtype."""
    import torch

    from zimage_lite.synthetic import write_synthetic_model

    start = time.perf_counter()
    write_synthetic_model(path, "full", seed=0, dtype=torch.bfloat16)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - start, "bytes": size}


def worker_full(src: Path, out: Path, quant: str, threads: int | None) -> dict:
    from zimage_lite.convert.converter import convert
    from zimage_lite.quant.formats import pick_quantizer, quantizer_version

    quant, _, variant = quant.partition(":")
    if variant == "no-prefetch":  # the A/B of --full-prefetch-ab: no read-ahead hints to the kernel
        import zimage_lite.convert.stream as stream

        stream._prefetch = lambda job: None
    cpu = cpu_seconds()
    r = convert(src, out, quant, force=True, progress=False, threads=threads)
    return {
        "seconds": r.seconds,
        "cpu_seconds": cpu_seconds() - cpu,
        "in_bytes": r.in_bytes,
        "out_bytes": r.out_bytes,
        "types": r.types,
        "quantizer": quantizer_version(pick_quantizer("cpu")) if quant != "bf16" else None,
    }


def _worker_main(args: argparse.Namespace) -> None:
    threads = args.threads or None
    if args.worker in ("ggml", "torch"):
        result = worker_ours(args.src, args.dst, args.qtype, threads, args.worker)
    elif args.worker == "ggml-1t":
        result = worker_ggml_single_thread(args.src, args.qtype)
    elif args.worker == "gguf-py":
        result = worker_gguf_py(args.src, args.dst, args.qtype)
    elif args.worker == "full-write":
        result = write_full_input(args.dst)
    else:
        result = worker_full(args.src, args.dst, args.qtype, threads)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _run(worker: str, src: Path, dst: Path, qtype: str, threads: int) -> dict:
    # Flush earlier runs' dirty pages first: otherwise a run can stall in the kernel's writeback
    # throttling for data another run wrote (seen as 4x spreads in BF16 times).
    if hasattr(os, "sync"):
        os.sync()
    load = _load_average()
    cmd = [sys.executable, __file__, "--worker", worker, "--src", str(src), "--dst", str(dst), "--qtype", qtype,
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{worker} {qtype} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["gb_per_s"] = result["in_bytes"] / 1e9 / result["seconds"]
    result["gb_per_cpu_s"] = result["in_bytes"] / 1e9 / max(result["cpu_seconds"], 1e-9)
    result["load_average_before"] = load
    if dst.exists() and dst.is_file():
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
    return (f"{tool:8} {qtype:9} {r['gb_per_s']:7.3f} GB/s {r['gb_per_cpu_s']:7.3f} GB/cpu-s {r['seconds']:7.1f} s  "
            f"peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  out {r['out_bytes'] / 1e6:8.1f} MB")  # fmt: skip


def _tools(qtype: str) -> list[str]:
    if qtype in ("BF16", "FP8_E4M3"):  # no block quantizer involved: one converter row
        return ["ggml", *(["gguf-py"] if qtype in GGUF_PY else [])]
    return ["ggml", "ggml-1t", "torch", *(["gguf-py"] if qtype in GGUF_PY else [])]


def _scaling(rows: dict, qtype: str, threads: int) -> dict | None:
    """The ggml converter row against ggml alone on one thread x threads (wall), and per CPU second."""
    if qtype not in rows.get("ggml-1t", {}):
        return None
    conv, single = rows["ggml"][qtype], rows["ggml-1t"][qtype]
    return {
        "wall_ratio": conv["gb_per_s"] / (single["gb_per_s"] * threads),
        "cpu_ratio": conv["gb_per_cpu_s"] / single["gb_per_cpu_s"],
    }


def run_medium(args: argparse.Namespace, tmp: Path, report: dict, threads: int) -> None:
    src = tmp / "medium.safetensors"
    write_medium_input(src, args.matrices, args.rows, args.cols)
    report["input"]["bytes"] = src.stat().st_size
    for qtype in [f.strip().upper() for f in args.formats.split(",") if f.strip()]:
        suffix = ".safetensors" if qtype == "FP8_E4M3" else ".gguf"
        tools = _tools(qtype)
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for rep in range(args.repeats):  # interleaved, so drift in the machine's load hits all tools alike
            for tool in tools:
                if tool == "torch" and qtype in K_TYPES and rep > 0:
                    continue  # the torch K-quants take minutes: one run
                runs[tool].append(_run(tool, src, tmp / f"{tool}{suffix}", qtype, args.threads))
        for tool in tools:
            report["rows"].setdefault(tool, {})[qtype] = r = _median(runs[tool])
            print(_line(tool, qtype, r), flush=True)
        if "gguf-py" in tools:
            g = report["rows"]["gguf-py"][qtype]["gb_per_s"]
            for tool in ("ggml", "torch"):
                if qtype in report["rows"].get(tool, {}):
                    report["rows"][tool][qtype]["speedup_vs_gguf_py"] = (
                        report["rows"][tool][qtype]["gb_per_s"] / g
                    )
        scaling = _scaling(report["rows"], qtype, threads)
        if scaling is not None:
            report["scaling"][qtype] = scaling
            print(f"{'':8} {qtype:9} ggml converter / (ggml 1 thread x {threads}): wall {scaling['wall_ratio']:.2f}, "
                  f"per CPU second {scaling['cpu_ratio']:.2f}", flush=True)  # fmt: skip
    src.unlink()


def run_full(args: argparse.Namespace, tmp: Path, report: dict) -> None:
    full_src = args.full_src
    if full_src is None:
        full_src = tmp / "z_image_bf16"
        report["full_input"] = _run_keep("full-write", full_src)
        print(f"wrote full-size input: {report['full_input']['bytes'] / 1e9:.1f} GB", flush=True)
    report["full_src"] = str(full_src)
    report["full"] = {}
    for quant in [q.strip() for q in args.full_quant.split(",") if q.strip()]:
        out = tmp / f"z_image-{quant}"
        for variant in [":no-prefetch", ""] if args.full_prefetch_ab else [""]:
            name = quant + variant
            report["full"][name] = r = _run("full", full_src, out, name, args.threads)
            print(_line("full", name, r), flush=True)
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=2)
    ap.add_argument("--rows", type=int, default=10240)
    ap.add_argument("--cols", type=int, default=3840)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and format; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="encoder threads (0: all cores)")
    ap.add_argument("--no-medium", action="store_true", help="only the --full conversions")
    ap.add_argument("--full", action="store_true", help="also convert a full-size BF16 model folder")
    ap.add_argument("--full-src", type=Path, default=None, help="that folder (default: write one)")
    ap.add_argument("--full-quant", default="q8_0,q4_k_m,fp8")
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

    threads = args.threads or os.cpu_count() or 1
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "input": {"matrices": args.matrices, "shape": [args.rows, args.cols], "dtype": "float32"},
        "threads": threads,
        "repeats": args.repeats,
        "load_average_at_start": _load_average(),
        "rows": {},
        "scaling": {},
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if not args.no_medium:
            run_medium(args, Path(tmp), report, threads)
        if args.full:
            run_full(args, Path(tmp), report)
    report["load_average_at_end"] = _load_average()
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
