"""Importance matrices: the mean square of each input channel of every linear, gathered by running the model.

llama.cpp's `llama-imatrix` and stable-diffusion.cpp's `--imat-out` gather, for each matmul weight, the sum
of x_j^2 over every input row x (token) it multiplies, and the number of rows. ggml's quantizers then weight
each column's rounding error by sum/count (quantize_row_*_impl's `quant_weights`), so channels that carry
large activations (trained transformers have a few) are kept more exactly.

`ImatrixCollector` hooks every linear (nn.Linear or QuantLinear, so any precision and streamed runs work:
the hook sees the input on whatever device the layer runs) and accumulates there; `collect(pipe, ...)`
runs generations through the normal runtime with the collector attached. Entries are keyed by the tensor
names our converter writes: ComfyUI names for the transformer (`layers.0.attention.qkv.weight`: one entry
for the fused qkv, which has one input), llama.cpp names for the text encoder (`blk.0.attn_q.weight`).
File formats: weights/imatrix_io.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from zimage_lite.errors import UsageError

log = logging.getLogger(__name__)

# A varied calibration set (not the bench's prompts, which measure the result): subjects, styles, lengths,
# text rendering and Chinese, as Z-Image is used.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a red fox standing in fresh snow at dawn, telephoto wildlife photograph",
    "portrait of an elderly fisherman with a weathered face, dramatic side light, 85mm",
    "a neon-lit cyberpunk alley in the rain, reflections on wet asphalt, wide angle",
    "watercolor painting of a lighthouse on a cliff, soft pastel sky",
    "isometric 3D render of a tiny cozy bedroom with plants and a cat, clay style",
    "a bowl of ramen with a soft-boiled egg, top-down food photography, steam",
    'a vintage poster with the words "SUMMER FESTIVAL 1968" in bold letters, halftone print',
    "一只熊猫在竹林里吃竹子，阳光透过树叶，写实摄影风格",
    "古老的江南水乡，石桥、乌篷船和白墙黑瓦，清晨薄雾",
    "macro photograph of a dewdrop on a spider web, bokeh background",
    "an astronaut riding a horse across a desert under two moons, cinematic",
    "minimalist line art of a woman's profile, black ink on white paper",
    "a busy Tokyo crossing at night seen from above, long exposure light trails",
    "oil painting of a stormy sea with a tall ship, in the style of the old masters",
    "a product shot of a glass perfume bottle on black marble, studio lighting, sharp focus",
    "children's book illustration of a bear and a rabbit having a picnic, gouache",
)


@dataclass
class Entry:
    """Sum of squares per input channel (float64, (in_features,)) and the rows (tokens) it came from."""

    sum2: torch.Tensor
    count: int

    def values(self) -> torch.Tensor:
        """The importance ggml takes: the mean square per channel, float32 (in_features,)."""
        return (self.sum2 / max(self.count, 1)).to(torch.float32)


@dataclass
class Imatrix:
    """Entries by converter tensor name; `chunks` runs (generations) of `chunk_size` image tokens each,
    over `datasets` (where the prompts came from)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    chunks: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def values(self, name: str) -> torch.Tensor | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.values()

    def merge(self, other: Imatrix) -> None:
        """Add `other`'s sums and counts (sd.cpp's several --imat-in; llama.cpp's --in-file)."""
        for name, e in other.entries.items():
            mine = self.entries.get(name)
            if mine is None:
                self.entries[name] = Entry(e.sum2.clone(), e.count)
            elif mine.sum2.shape != e.sum2.shape:
                raise UsageError(
                    f"imatrix entry {name}: {tuple(e.sum2.shape)} channels, not {tuple(mine.sum2.shape)}"
                )
            else:
                mine.sum2 += e.sum2
                mine.count += e.count
        self.chunks += other.chunks
        self.chunk_size = self.chunk_size or other.chunk_size
        self.datasets += [d for d in other.datasets if d not in self.datasets]


def _is_linear(module: nn.Module) -> bool:
    from zimage_lite.runtime.quant_linear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


class ImatrixCollector:
    """Forward pre-hooks on every linear of the modules given to `attach`; sums stay on the device the
    layer ran on (float64) until `result()`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._hooks: list = []

    def attach(self, model: nn.Module, name_of: Callable[[str], str]) -> int:
        """Hook every linear of `model`; `name_of(module path)` gives its entry name. Returns how many."""
        n = 0
        for path, module in model.named_modules():
            if _is_linear(module):
                self._hooks.append(module.register_forward_pre_hook(self._hook(name_of(path))))
                n += 1
        return n

    def _hook(self, name: str):
        def pre(module: nn.Module, args) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
            s = rows.float().square().sum(0).double()
            if name in self._sums:
                self._sums[name] += s.to(self._sums[name].device)
            else:
                self._sums[name] = s
            self._counts[name] = self._counts.get(name, 0) + rows.shape[0]

        return pre

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def result(self) -> dict[str, Entry]:
        entries = {}
        for name, s in self._sums.items():
            if not torch.isfinite(s).all():
                raise UsageError(
                    f"imatrix entry {name}: the activations overflowed (NaN/Inf); try --dtype float32"
                )
            entries[name] = Entry(s.cpu(), self._counts[name])
        return entries


def transformer_name(path: str) -> str:
    return f"{path}.weight"


def text_encoder_name(path: str) -> str:
    from zimage_lite.weights.names_qwen3 import hf_to_gguf_name

    return hf_to_gguf_name(f"{path}.weight")


def collect(
    pipe,
    prompts: Iterable[str],
    *,
    steps: int = 8,
    width: int = 1024,
    height: int = 1024,
    seed: int = 0,
    dataset: str = "",
    on_prompt: Callable[[int], None] | None = None,
) -> Imatrix:
    """Run `pipe.generate_latents` once per prompt (seed, seed+1, ...) with every linear of the transformer
    and the text encoder hooked; the VAE is not run (it has no linears the converter quantizes)."""
    collector = ImatrixCollector()
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts to gather an imatrix from")
    try:
        collector.attach(pipe.transformer, transformer_name)
        collector.attach(pipe.text_encoder, text_encoder_name)
        for i, prompt in enumerate(prompts):
            pipe.generate_latents(prompt, seed=seed + i, steps=steps, width=width, height=height)
            if on_prompt is not None:
                on_prompt(i)
    finally:
        collector.detach()
    patch = pipe.transformer.config.patch_size
    tokens = (width // (8 * patch)) * (height // (8 * patch))
    return Imatrix(collector.result(), len(prompts), tokens, [dataset] if dataset else [])
