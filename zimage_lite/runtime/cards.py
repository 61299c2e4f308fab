"""Which compute dtype each GPU generation gets, and why: a table (printed verbatim into the README) and
the one function that applies it. The capability is a parameter, so the choice is tested on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zimage_lite.errors import UsageError


@dataclass(frozen=True)
class Generation:
    min_capability: tuple[int, int]
    cards: str
    dtype: torch.dtype | None  # None: refused
    why: str


GENERATIONS = (
    Generation(
        (8, 0), "sm 8.0 and newer: Ampere, Ada, Hopper, Blackwell (RTX 30xx/40xx/50xx, A100, H100)",
        torch.bfloat16,
        "bf16 tensor cores; float32's exponent range, so nothing overflows; the reference's own dtype",
    ),
    Generation(
        (7, 0), "sm 7.x: Volta, Turing (RTX 20xx, GTX 16xx, Titan V, V100, T4)", torch.float16,
        "no bf16; fp16 runs at full or double rate. Overflow-free by design (models/numerics.py: "
        "float32 residual streams and products, power-of-two scaled output projections), and a step "
        "that still overflows is redone in float32 (runtime/fp32_fallback.py)",
    ),
    Generation(
        (6, 0), "sm 6.x: Pascal (GTX 10xx, Titan X/Xp, P40; P100)", torch.float32,
        "fp16 arithmetic runs at 1/64 of fp32 on consumer Pascal and there are no tensor cores, so "
        "float32 is both the fast and the exact choice; the planner counts 4-byte activations and the "
        "torch dequantization path (Triton needs sm 8.0 for its kernels here)",
    ),
    Generation(
        (0, 0), "below sm 6.0: Maxwell and older (GTX 9xx, GTX 750)", None,
        "refused: current PyTorch CUDA builds are not made for them and nothing here was written or "
        "measured for them",
    ),
)  # fmt: skip
MIN_CAPABILITY = GENERATIONS[-2].min_capability


def generation(capability: tuple[int, int]) -> Generation:
    return next(g for g in GENERATIONS if tuple(capability) >= g.min_capability)


def capability_of(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for the CPU."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def compute_dtype(capability: tuple[int, int] | None, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype to compute in on a device of `capability` (None: the CPU, float32 unless `requested`).
    Raises UsageError (one line) for cards below sm 6.0 and for bf16 on cards without it."""
    if capability is None:
        return requested or torch.float32
    gen = generation(capability)
    sm = f"sm {capability[0]}.{capability[1]}"
    if gen.dtype is None:
        raise UsageError(
            f"this GPU ({sm}) is older than Pascal: zimage-lite needs compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (use --device cpu)"
        )
    if requested == torch.bfloat16 and capability < (8, 0):
        raise UsageError(f"this GPU ({sm} < 8.0) has no bfloat16 support: use --dtype float16 or float32")
    return requested or gen.dtype


def markdown_table() -> str:
    """The README's table: card generation, dtype, why."""
    rows = ["| cards | compute dtype | why |", "|---|---|---|"]
    for g in GENERATIONS:
        dtype = "refused" if g.dtype is None else str(g.dtype).removeprefix("torch.")
        rows.append(f"| {g.cards} | {dtype} | {g.why} |")
    return "\n".join(rows)
