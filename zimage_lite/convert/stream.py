"""Streaming conversion: tensors are loaded, checked, encoded and written one at a time.

A `Job` makes the output tensor(s) of one logical weight. `run_jobs` encodes jobs in a small thread pool
(torch's kernels release the GIL) with at most `threads + 1` jobs in flight, and hands the results to the
writer strictly in job order, so memory stays at a few tensors whatever the model size and the file is
written front to back. With ggml's quantizers a second pool of `threads` runs the chunks of every
quantized tensor (formats.quantize; ctypes releases the GIL), first come first served: all threads work
on the oldest tensor, a large one included, and each holds one chunk's float32 copy. A tqdm bar counts
input bytes (with rate and ETA).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from zimage_lite.errors import CheckpointError, NonFiniteError

log = logging.getLogger(__name__)

# storage type -> torch dtype, for outputs that are plain values
DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output file: name, torch-order shape, storage ("F32", "Q4_K", "FP8_E4M3", "U8"...)."""

    name: str
    shape: tuple[int, ...]
    storage: str


@dataclass
class Job:
    """Make `outputs` from one logical weight: `load()` returns it dense (shape `shape`), `release()` lets
    the source drop its pages afterwards, `prefetch()` asks it to start reading them ahead of `load()`."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    load: Callable[[], torch.Tensor]
    in_bytes: int
    outputs: list[OutTensor] = field(default_factory=list)
    release: Callable[[], None] | None = None
    origin: str = ""  # where the weight comes from, for error messages
    prefetch: Callable[[], None] | None = None
    imatrix: torch.Tensor | None = None  # importance per input channel, for ggml's quantizers (calibrated.py)


def encode(
    job: Job, device: str | None = None, quantizer: str | None = None, pool: Executor | None = None
) -> dict[str, torch.Tensor]:
    """Load, validate (shape, finite values) and encode one job -> {output name: CPU tensor}.

    `device` (e.g. "cuda"): where to quantize (the torch quantizers there). `quantizer`, `pool`: as
    formats.quantize (None: ggml's on the CPU where installed; threads that share its chunks)."""
    from zimage_lite.quant.formats import QUANT_TYPES, quantize_on

    if device is not None and job.qtype in QUANT_TYPES:
        device = quantize_on(job.qtype, device)  # K-quants stay on the CPU (ggml's)
    try:
        w = job.load()
        if device is not None:
            w = w.to(device)
        if tuple(w.shape) != tuple(job.shape):
            raise CheckpointError(
                f"{job.origin}tensor {job.name} has shape {tuple(w.shape)}, expected {job.shape}"
            )
        try:  # the quantizers check the values themselves, in passing where they can
            out = _encode_values(job, w, quantizer, pool)
        except NonFiniteError:
            raise CheckpointError(f"{job.origin}tensor {job.name} holds NaN or infinite values") from None
    finally:
        if job.release is not None:
            job.release()
    return {name: t.cpu() for name, t in out.items()} if device is not None else out


def _encode_values(
    job: Job, w: torch.Tensor, quantizer: str | None, pool: Executor | None
) -> dict[str, torch.Tensor]:
    """One loaded weight -> its output tensors; NonFiniteError on NaN/Inf."""
    from zimage_lite.quant.formats import QUANT_TYPES, all_finite, quantize

    if job.qtype in QUANT_TYPES:
        return {job.name: quantize(w, job.qtype, quantizer, pool, imatrix=job.imatrix)}
    if job.qtype == "FP8_E4M3":
        from zimage_lite.quant.fp8 import quantize_fp8
        from zimage_lite.weights.fp8 import comfy_quant_marker

        q, scale = quantize_fp8(w)
        layer = job.name.removesuffix(".weight")
        return {
            job.name: q,
            layer + ".weight_scale": scale.reshape(()),
            layer + ".comfy_quant": comfy_quant_marker(),
        }
    if job.qtype not in DENSE:
        raise CheckpointError(f"cannot store tensor {job.name} as {job.qtype}")
    if w.is_floating_point() and not all_finite(w):
        raise NonFiniteError(job.name)
    return {job.name: w.to(DENSE[job.qtype]).contiguous()}


def _prefetch(job: Job) -> None:
    if job.prefetch is not None:
        job.prefetch()


@contextmanager
def _torch_threads(n: int):
    """One intra-op thread per worker while the pool runs: the pool is the parallelism, and nested
    OpenMP teams would oversubscribe the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)


def run_jobs(
    jobs: Sequence[Job],
    write: Callable[[str, torch.Tensor], None],
    threads: int | None = None,
    progress: bool = True,
    desc: str = "convert",
    device: str | None = None,
    quantizer: str | None = None,
) -> None:
    """Encode every job (on `device`, default the CPU; with `quantizer`, see formats.quantize) and
    `write(name, tensor)` each output, in job order."""
    from zimage_lite.quant.formats import pick_quantizer

    threads = max(1, threads or os.cpu_count() or 1)
    chunked = threads > 1 and pick_quantizer(device or "cpu", quantizer) == "ggml"
    bar = _progress(sum(j.in_bytes for j in jobs), desc, progress)
    pending: deque[tuple[Job, Future]] = deque()

    def drain_one() -> None:
        job, fut = pending.popleft()
        for name, tensor in fut.result().items():
            write(name, tensor)
        if bar is not None:
            bar.update(job.in_bytes)

    try:
        if threads == 1:
            if jobs:
                _prefetch(jobs[0])
            for i, job in enumerate(jobs):
                if i + 1 < len(jobs):
                    _prefetch(jobs[i + 1])  # the next job's reads overlap this one's work
                for name, tensor in encode(job, device, quantizer).items():
                    write(name, tensor)
                if bar is not None:
                    bar.update(job.in_bytes)
            return
        with ExitStack() as stack:
            stack.enter_context(_torch_threads(1))
            pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="zimage-convert"))
            chunks = ThreadPoolExecutor(threads, thread_name_prefix="zimage-ggml") if chunked else None
            if chunks is not None:  # closed first; on an error its queued chunks are dropped, not run
                stack.callback(chunks.shutdown, wait=True, cancel_futures=True)
            try:
                for job in jobs:
                    if len(pending) > threads:
                        drain_one()
                    _prefetch(job)  # its disk reads overlap the work of the jobs ahead of it
                    pending.append((job, pool.submit(encode, job, device, quantizer, chunks)))
                while pending:
                    drain_one()
            except BaseException:
                for _, fut in pending:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
