"""Low-rank updates beside any linear layer: y = linear(x) + (x @ down^T) @ up^T.

The update runs beside the layer's own matmul, so it works unchanged on nn.Linear and on FP8 / GGUF
QuantLinear, whose weights are never dequantized for it (PEFT's LoRA forward, not a merge). A forward
hook adds it; the tensors are non-persistent buffers of a child module `lora` of the linear, so the
streamer moves them with their block, the planner counts their bytes, and state dicts do not change.
Several LoRAs on one layer are concatenated along the rank, each one's scale folded into its up
columns: one extra pair of thin matmuls per layer, however many LoRAs are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zimage_lite.weights.lora import LowRank


class LowRankDelta(nn.Module):
    """x -> (x @ down^T) @ up^T in the dtype of its tensors; `down` (rank, in), `up` (out, rank)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.hook: torch.utils.hooks.RemovableHandle | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _add_delta(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + linear.lora(args[0]).to(output.dtype)


def remove_loras(model: nn.Module) -> None:
    """Detach every LowRankDelta from `model`'s linears."""
    for module in model.modules():
        delta = module._modules.get("lora")
        if isinstance(delta, LowRankDelta):
            if delta.hook is not None:
                delta.hook.remove()
            del module._modules["lora"]


def combine(loras: Sequence[tuple[Mapping[str, LowRank], float]]) -> dict[str, LowRank]:
    """Several (file's updates, user scale) -> one LowRank per layer: ranks concatenated, scales in up."""
    by_layer: dict[str, list[LowRank]] = {}
    for updates, scale in loras:
        for path, pair in updates.items():
            by_layer.setdefault(path, []).append(LowRank(pair.down, pair.up * scale))
    return {
        path: LowRank(torch.cat([p.down for p in pairs]), torch.cat([p.up for p in pairs], dim=1))
        for path, pairs in by_layer.items()
    }


def apply_loras(
    model: nn.Module, loras: Sequence[tuple[Mapping[str, LowRank], float]], dtype: torch.dtype
) -> int:
    """Replace `model`'s low-rank updates by `loras` (none: remove them); tensors in `dtype` beside each
    layer's weight. Returns the bytes added."""
    remove_loras(model)
    added = 0
    for path, pair in combine(loras).items():
        linear = model.get_submodule(path)
        device = next(linear.parameters()).device
        delta = LowRankDelta(pair.down.to(device, dtype), pair.up.to(device, dtype))
        linear.lora = delta
        delta.hook = linear.register_forward_hook(_add_delta)
        added += delta.down.nbytes + delta.up.nbytes
    return added
