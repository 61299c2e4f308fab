"""Strict loading of a state dict into a model built on the meta device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from zimage_lite.errors import CheckpointError

_DENSE_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise one error naming missing, unexpected and misshapen tensors."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    wrong = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in sorted(expected.keys() & found.keys())
        if tuple(found[k]) != tuple(expected[k])
    ]
    if wrong:
        problems.append(
            f"wrong shapes: {'; '.join(wrong[:4])}" + (f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else "")
        )
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def build_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model without allocating its weights."""
    with torch.device("meta"):
        return factory()


def load_strict(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Assign `tensors` to `model`'s parameters: every key must match by name and shape.

    Dense floating tensors are cast to `dtype` (if given); integer tensors (raw quantized bytes) and
    float8 tensors (FP8 weights, whose scales come separately) are kept as they are. `device`: move
    them there; None leaves each where it is (a default device here once moved every tensor of a
    GPU load back to the host).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in tensors.items()}, what)
    state = {}
    for name, t in tensors.items():
        if dtype is not None and t.dtype in _DENSE_FLOATS:
            t = t.to(dtype)
        state[name] = t if device is None else t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model
