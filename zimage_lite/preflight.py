"""Resources checked before the work: disk space for a conversion, host memory for a generation.

Each check compares an estimate with what the machine has now and raises `ResourceError` with both
numbers and what to do, so a run that cannot finish is refused in a second instead of dying half-way.
The estimates are the runtime's own (the planner's activation formulas, the VAE decode bytes, the
tensors the loaders will hold); a check whose measurement is unavailable (no /proc/meminfo, no psutil)
is skipped rather than guessed. Device memory is the planner's to check (Pipeline._plan refuses a budget
too small before any work); when CUDA runs out anyway, `device_oom_as_error` names the phase and a
`--vram` the planner accepts.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from zimage_lite.errors import UsageError
from zimage_lite.runtime.budget import GIB, KIB, MIB, format_bytes

log = logging.getLogger(__name__)

FILE_SLACK_BYTES = 64 * KIB  # per output file: header, metadata, file-system blocks
TENSOR_SLACK_BYTES = 256  # per tensor: its name and shape in the header, alignment padding
HOST_RESERVE_BYTES = 512 * MIB  # left to the OS and to Python's own allocations
SMALLER = "try a smaller --width/--height/--batch, or close other programs"
_SAFETENSORS_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "FP8_E4M3": 1, "U8": 1}


class ResourceError(UsageError):
    """The machine lacks what a run needs (disk, host or device memory); the message has the numbers."""


# -- measuring the machine -----------------------------------------------------------------------------
def available_host_bytes() -> int | None:
    """Memory the OS can give without swapping (MemAvailable), or None when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that `path` (or its nearest existing parent) is on."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return shutil.disk_usage(existing).free


# -- conversion ----------------------------------------------------------------------------------------
def output_tensor_bytes(container: str, shape: tuple[int, ...], storage: str) -> int:
    """Bytes one declared output tensor takes in its file."""
    if container == "gguf":
        from zimage_lite.weights.gguf_writer import tensor_nbytes

        return -(-tensor_nbytes(shape, storage) // 32) * 32  # GGUF aligns each tensor to 32 bytes
    return math.prod(shape) * _SAFETENSORS_ITEM[storage]


def convert_output_bytes(plans: Iterable, copied: Iterable[Path] = ()) -> int:
    """Size of a conversion's output: every planned tensor, header slack, and copied folders
    (tokenizer, scheduler; a tokenizer also lands in the text encoder's GGUF metadata, so it counts
    twice when copied)."""
    plans = list(plans)
    outputs = [(p.container, o) for p in plans for o in p.outputs]
    tensors = sum(output_tensor_bytes(c, o.shape, o.storage) + TENSOR_SLACK_BYTES for c, o in outputs)
    files = sum(
        f.stat().st_size for folder in copied if folder.is_dir() for f in folder.rglob("*") if f.is_file()
    )
    return tensors + 2 * files + FILE_SLACK_BYTES * (len(plans) + 1)  # one file per plan, a manifest


def check_disk(out: Path, need_bytes: int) -> None:
    """Refuse a conversion whose output will not fit on the disk it goes to."""
    free = free_disk_bytes(out.parent if out.parent != Path("") else Path("."))
    log.info("disk: the output needs about %s, %s free", format_bytes(need_bytes), format_bytes(free))
    if need_bytes > free:
        raise ResourceError(
            f"not enough disk space for {out}: it needs about {format_bytes(need_bytes)}, "
            f"{format_bytes(free)} is free there; free some space or write elsewhere (-o)"
        )


def check_synthetic(out: Path, size: str, dtype: torch.dtype) -> None:
    """Refuse a synthetic model that will not fit on the disk or in host memory while it is written."""
    from zimage_lite.synthetic import planned_bytes

    disk, host = planned_bytes(size, dtype)
    check_disk(out, disk + FILE_SLACK_BYTES * 16)
    _check_host(
        host, f"writing the {size} synthetic model", "write a smaller --size, or close other programs"
    )


# -- generation: before loading ------------------------------------------------------------------------
def held_weight_bytes(paths, dtype: torch.dtype) -> int:
    """Bytes the loaders will hold for the three components: dense tensors in the compute dtype,
    quantized ones (GGUF blocks, FP8) as stored."""
    from zimage_lite.weights.checkpoint import open_checkpoint
    from zimage_lite.weights.loaders import DENSE_QTYPES  # the types the loaders cast to `dtype`

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in (paths.transformer, paths.text_encoder, paths.vae):
        source = open_checkpoint(path)
        for key in source.keys():
            dense = source.qtype(key) in DENSE_QTYPES
            total += math.prod(source.shape(key)) * size if dense else source.nbytes(key)
    return total


def check_load(paths, dtype: torch.dtype) -> None:
    """Refuse to load weights that cannot fit in host memory (where the pipeline holds them; each
    phase places its share on the device per its plan)."""
    need = held_weight_bytes(paths, dtype)
    advice = "use a quantized model (convert it to GGUF or FP8), or close other programs"
    _check_host(need, "loading the model", advice)


def _check_host(need: int, what: str, advice: str = SMALLER) -> None:
    available = available_host_bytes()
    log.info("host memory: %s needs about %s, %s available", what, format_bytes(need),
             "unknown" if available is None else format_bytes(available))  # fmt: skip
    if available is not None and need + HOST_RESERVE_BYTES > available:
        raise ResourceError(
            f"not enough host memory: {what} needs about {format_bytes(need)}, "
            f"{format_bytes(available)} is available: {advice}"
        )


# -- generation: after loading, before the first step ----------------------------------------------------
def activation_bytes(pipe, width: int, height: int, images: int, caption_tokens: int) -> int:
    """Peak activation bytes of the largest phase, all on one device, nothing tiled."""
    from zimage_lite.runtime.planner import dit_activation_bytes, qwen3_activation_bytes
    from zimage_lite.runtime.vae_tiling import decode_bytes

    f = pipe.vae.config.scale_factor
    h, w = math.ceil(height / f), math.ceil(width / f)
    return max(
        qwen3_activation_bytes(pipe.text_encoder.config, caption_tokens, 1, pipe.dtype),
        dit_activation_bytes(pipe.transformer.config, width, height, images, pipe.dtype, caption_tokens),
        decode_bytes(pipe.vae.config, h, w, images, pipe.vae.dtype, None),
    )


def output_bytes(pipe, width: int, height: int, images: int) -> int:
    """Host bytes of the results: float32 latents, and the uint8 pixels twice (array and PIL images)."""
    f = pipe.vae.config.scale_factor
    latents = images * pipe.transformer.config.in_channels * (height // f) * (width // f) * 4
    return latents + 2 * images * height * width * 3


def check_generation(pipe, width: int, height: int, images: int, caption_tokens: int) -> None:
    """Refuse a generation whose host memory cannot hold its results (and, on the CPU, its
    activations), with the numbers. The device side is the planner's (Pipeline._plan, before any work)."""
    need = output_bytes(pipe, width, height, images)
    if pipe.device.type != "cuda":
        acts = activation_bytes(pipe, width, height, images, caption_tokens)
        if pipe.budget.total_bytes is not None:
            acts = min(acts, pipe.budget.total_bytes)  # the planner keeps each phase (VAE tiles too) in it
        need += acts
    _check_host(need, f"generating {images} image(s) of {width}x{height}")


# -- what to suggest -----------------------------------------------------------------------------------
def _explicit_budget(total: int, device: torch.device):
    """The budget `--vram <total bytes>` gives on `device` (as budget.resolve_budget makes it, without
    clamping to what is free now)."""
    from zimage_lite.runtime.budget import DEFAULT_CUDA_CONTEXT_BYTES, VramBudget, allocator_margin

    if device.type != "cuda":
        return VramBudget(total, 0, "explicit")
    return VramBudget(total, DEFAULT_CUDA_CONTEXT_BYTES, "explicit", allocator_margin(total))


def _plans(pipe, total: int, width: int, height: int, images: int, caption_tokens: int) -> bool:
    from zimage_lite.runtime.phases import plan_phases

    try:
        plan_phases(
            pipe.text_encoder, pipe.transformer, pipe.vae, _explicit_budget(total, pipe.device), pipe.device,
            width=width, height=height, images=images, caption_tokens=caption_tokens, dtype=pipe.dtype,
            controlnet=getattr(pipe, "controlnet", None),
        )  # fmt: skip
    except UsageError:
        return False
    return True


def vram_minimum(pipe, width: int, height: int, images: int, caption_tokens: int) -> int | None:
    """The smallest budget (to 64 MB) the planner accepts for this generation, or None if none up to
    1 TB does."""
    low, high, step = 0, 1 << 40, 64 * MIB
    if not _plans(pipe, high, width, height, images, caption_tokens):
        return None
    while high - low > step:
        mid = (low + high) // 2
        if _plans(pipe, mid, width, height, images, caption_tokens):
            high = mid
        else:
            low = mid
    return high


def vram_suggestion(pipe, width: int, height: int, images: int, caption_tokens: int) -> int | None:
    """A --vram value to suggest: the planner's minimum, or a quarter less than the budget that just
    failed when that budget was already above the minimum (the estimate was short, or others use the GPU)."""
    minimum = vram_minimum(pipe, width, height, images, caption_tokens)
    current = pipe.budget.total_bytes
    if minimum is not None and current is not None and current > minimum:
        return max(minimum, current * 3 // 4)
    return minimum


def _try_vram(n: int | None) -> str:
    if n is None:
        return "try a smaller --width/--height or --batch"
    return f"try --vram {math.ceil(n / GIB * 10) / 10:.1f}GB"


def device_oom_message(pipe, phase: str, width: int, height: int, images: int, caption_tokens: int) -> str:
    """The one line for a CUDA out-of-memory error during a run."""
    n = vram_suggestion(pipe, width, height, images, caption_tokens)
    return f"out of device memory in phase {phase}: {_try_vram(n)}"


# -- the two calls the command line makes --------------------------------------------------------------
def before_load(
    model, transformer, text_encoder, vae, tokenizer, device: str | None, dtype: str | None
) -> None:
    """`check_load` for Pipeline.load's arguments, resolved the way it resolves them."""
    from zimage_lite.pipeline import DTYPES, default_dtype, resolve_device
    from zimage_lite.weights.components import resolve_model

    compute = DTYPES[dtype] if dtype in DTYPES else default_dtype(resolve_device(device))
    check_load(resolve_model(model, transformer, text_encoder, vae, tokenizer), compute)


# Pipeline.last_stats.phases gets each phase's time when it completes: the first one missing was running
_PHASE_ORDER = (("text_encoder", "text encoder"), ("denoise", "transformer"), ("vae", "VAE decode"))


def running_phase(pipe) -> str | None:
    """The phase of `pipe`'s generation that was running when it stopped (None: all had finished)."""
    done = pipe.last_stats.phases
    return next((label for key, label in _PHASE_ORDER if key not in done), None)


@contextmanager
def device_oom_as_error(pipe, width: int, height: int, images: int, tokens: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error inside the block into a ResourceError naming the phase and a
    --vram the planner accepts."""
    from zimage_lite.cli_errors import is_device_oom, phase_of

    try:
        yield
    except Exception as exc:
        if not is_device_oom(exc):
            raise
        phase = running_phase(pipe) or phase_of(exc.__traceback__)
        raise ResourceError(device_oom_message(pipe, phase, width, height, images, tokens)) from exc
