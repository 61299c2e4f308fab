"""VRAM budgets: `--vram 6GB` / `512MB` / `5.5GiB` / `auto` -> bytes, and bytes -> "3.1 GB" for messages.

Units are binary whatever their spelling: GPU memory is sold and reported (nvidia-smi, torch) in binary
units, so a "6 GB" RTX 3060 laptop has 6144 MiB and `--vram 6GB` must mean 6 * 2**30 bytes. A bare
number is GiB (`--vram 6`).

`auto` on CUDA means "what is free now, minus a margin": the CUDA context already exists when the free
memory is measured, so an auto budget needs no context allowance (`VramBudget.context_bytes` is 0). An
explicit budget stands for the whole card, so the context is accounted inside it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from zimage_lite.errors import UsageError

log = logging.getLogger(__name__)

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": GIB,
    "b": 1,
    **dict.fromkeys(("k", "kb", "kib"), KIB),
    **dict.fromkeys(("m", "mb", "mib"), MIB),
    **dict.fromkeys(("g", "gb", "gib"), GIB),
    **dict.fromkeys(("t", "tb", "tib"), TIB),
}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")

# What a CUDA context (driver, cuBLAS workspaces, kernel images) costs on a real card: measured values are
# 300-500 MB depending on driver, card and libraries loaded; the planner takes this unless told otherwise.
DEFAULT_CUDA_CONTEXT_BYTES = 400 * MIB
# Kept free under an `auto` budget: other processes (the desktop) may grow while we run.
DEFAULT_AUTO_MARGIN_BYTES = 256 * MIB
# What `--card N` leaves outside PyTorch's allocator on an N GB card: the CUDA context and a display.
CARD_CONTEXT_BYTES = 512 * MIB


def allocator_margin(total_bytes: int) -> int:
    """Bytes of a CUDA budget the planner leaves free for the caching allocator's rounding (blocks of
    2 MB, 512-byte granules) and fragmentation: 1/32 of the budget, at least 128 MB. On the first 4 GB
    run a plan using 4.23 of 4.29 GB died in the allocator. NOT MEASURED on a card yet: the GPU check
    (benchmarks/gpu_check.py) reports the real peak under each --card cap, which decides this."""
    return max(128 * MIB, total_bytes // 32)


def parse_vram(spec: str | int | float | None) -> int | None:
    """Bytes for "4GB", "6GiB", "512MB", "5.5G", "6" (GiB) or an int (bytes); None for "auto"/None."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise UsageError(f"invalid VRAM budget {spec!r}")
    if isinstance(spec, (int, float)):
        value, unit = float(spec), 1
    else:
        text = spec.strip().lower()
        if text == "auto":
            return None
        m = _SPEC.match(text)
        if m is None or m.group(2) not in _UNITS:
            raise UsageError(f"invalid VRAM budget {spec!r}: use a size like 4GB, 6GiB, 512MB, or auto")
        value, unit = float(m.group(1)), _UNITS[m.group(2)]
    n = int(value * unit)
    if n <= 0:
        raise UsageError(f"invalid VRAM budget {spec!r}: it must be more than zero")
    return n


def format_bytes(n: int, digits: int = 1) -> str:
    """'3.1 GB', '512 MB' (binary units, named as users name them); `digits` after the point for GB
    (and, when digits > 1, one decimal for MB, so a budget and a minimum never print the same)."""
    if abs(n) >= GIB:
        return f"{n / GIB:.{digits}f} GB"
    if abs(n) >= MIB:
        return f"{n / MIB:.{1 if digits > 1 else 0}f} MB"
    return f"{n / KIB:.0f} KB" if abs(n) >= KIB else f"{n} B"


@dataclass(frozen=True)
class VramBudget:
    """What the planner may use: `total_bytes` (None: unlimited, nothing streams) of which
    `context_bytes` are taken by the CUDA context before any tensor exists and `margin_bytes` are kept
    free for the allocator (`allocator_margin`; 0 on the CPU, whose ledger is exact)."""

    total_bytes: int | None
    context_bytes: int
    source: str  # "explicit", "auto", "card" or "unlimited"
    margin_bytes: int = 0


def resolve_budget(
    spec: str | int | None,
    device: torch.device,
    *,
    context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES,
    auto_margin_bytes: int = DEFAULT_AUTO_MARGIN_BYTES,
) -> VramBudget:
    """The budget for `--vram spec` on `device`.

    CPU: an explicit budget is honoured with no context (this is how streaming is tested without a
    GPU); auto means unlimited. CUDA: auto = free memory now - margin (context already paid); an
    explicit budget larger than the card can give is clamped to it (with a warning), so a wrong
    `--vram` cannot turn into an out-of-memory error in the middle of a run.
    """
    n = parse_vram(spec)
    if device.type != "cuda":
        return VramBudget(n, 0, "explicit") if n is not None else VramBudget(None, 0, "unlimited")
    free, _total = torch.cuda.mem_get_info(device)  # creates the context if there is none yet
    ours = torch.cuda.memory_reserved(device)  # our cached blocks are reusable, count them as free
    available = free + ours
    if n is None:
        total = max(available - auto_margin_bytes, 0)
        return VramBudget(total, 0, "auto", allocator_margin(total))
    if n - context_bytes > available:
        log.warning(
            "--vram %s exceeds what this GPU has free (%s + context): using %s",
            format_bytes(n), format_bytes(available), format_bytes(available + context_bytes),
        )  # fmt: skip
        n = available + context_bytes
    return VramBudget(n, context_bytes, "explicit", allocator_margin(n))


def emulate_card(spec: str | int, device: torch.device) -> VramBudget:
    """`--card 6GB`: run as on a card of that size. On CUDA, PyTorch's allocator is capped at what such
    a card leaves it (card - CARD_CONTEXT_BYTES), so an over-budget plan fails here as it would there;
    on the CPU the device ledger gets the same capacity. Returns the budget to plan with."""
    n = parse_vram(spec)
    if n is None:
        raise UsageError(f"--card needs a size like 4GB, 6GB or 8GB (got {spec!r})")
    if device.type != "cuda":
        return VramBudget(n, 0, "card")
    if n <= CARD_CONTEXT_BYTES:
        raise UsageError(
            f"--card {spec}: a card is larger than its context ({format_bytes(CARD_CONTEXT_BYTES)})"
        )
    total = torch.cuda.get_device_properties(device).total_memory
    if n > total:
        raise UsageError(f"--card {spec} is larger than this GPU ({format_bytes(total)})")
    torch.cuda.set_per_process_memory_fraction((n - CARD_CONTEXT_BYTES) / total, device)
    log.info(
        "emulating a %s card: allocator capped at %s", format_bytes(n), format_bytes(n - CARD_CONTEXT_BYTES)
    )
    return VramBudget(n, CARD_CONTEXT_BYTES, "card", allocator_margin(n))
