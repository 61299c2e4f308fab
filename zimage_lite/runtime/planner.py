"""VRAM planner: which blocks stay resident on the device, which stream through a ring of slots.

Everything a phase puts on the device is accounted here, in one place:

    context + fixed weights + resident blocks + ring_slots * slot_bytes + activations + dequant scratch

- context: the CUDA context (0 on the CPU, 0 under an `auto` budget that measured free memory after it).
- fixed weights: parameters outside the streamable blocks (embedders, final layer, pad tokens).
- blocks: bytes of each block's tensors packed into one flat buffer (`packed_layout`, ALIGN-aligned
  views), exactly what the streamer allocates.
- ring: `prefetch_depth + 1` slots, each as large as the largest streamed block: one slot is computed
  from while `prefetch_depth` others are being filled.
- activations: `dit_activation_bytes` / `qwen3_activation_bytes` below (the formulas, with their terms).
- dequant scratch: the largest quantized linear dequantized to the compute dtype (`dequant_scratch_bytes`).
- fp32 fallback (float16 transformer only): what a step redone with float32 compute needs beyond the
  float16 working set (`fp32_fallback_bytes`; runtime/fp32_fallback.py).

`plan_blocks` is a pure function of integers (property-tested): it keeps as many blocks resident as
fit, streams the rest, and refuses an impossible budget with the exact minimum it would need.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from zimage_lite.config import DiTConfig, Qwen3Config
from zimage_lite.errors import UsageError
from zimage_lite.runtime.budget import format_bytes

ALIGN = 256  # byte alignment of every tensor view in a packed buffer (cuBLAS / vector loads like 256)
ATTENTION_KINDS = ("efficient", "math")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def packed_layout(sizes: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets of tensors of `sizes` bytes packed in order, each start aligned; and the total size."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end = _round_up(end + n, align)
    return offsets, end


def block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner module, attribute name, tensor) for every parameter and buffer of `block`, each tensor
    once (tied tensors are listed at their first owner only)."""
    seen: set[int] = set()
    out = []
    for module in block.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((module, name, t))
    return out


def block_bytes(block: nn.Module) -> int:
    """Device bytes of `block` packed into one buffer (works on meta-device modules)."""
    return packed_layout([t.nbytes for _, _, t in block_tensors(block)])[1]


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors)


UNLIMITED = 1 << 62  # a budget that always plans: used to read each phase's minimum, and with no budget


@dataclass(frozen=True)
class Plan:
    """A placement of blocks (indices into the block list, in execution order) inside a budget."""

    budget_bytes: int
    block_bytes: tuple[int, ...]
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    ring_slots: int
    slot_bytes: int
    accounted: Mapping[str, int] = field(default_factory=dict)
    minimum_bytes: int = 0
    what: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.accounted.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.accounted.items() if v)
        return (
            f"{self.what}: {len(self.resident)} blocks resident, {len(self.streamed)} streamed through "
            f"{self.ring_slots} slots of {format_bytes(self.slot_bytes)}; {format_bytes(self.total_bytes)} "
            f"of {'no limit' if self.budget_bytes >= UNLIMITED else format_bytes(self.budget_bytes)} ({parts})"
        )

    def to_dict(self) -> dict:
        return {
            "budget_bytes": None if self.budget_bytes >= UNLIMITED else self.budget_bytes,  # None: no limit
            "minimum_bytes": self.minimum_bytes,
            "total_bytes": self.total_bytes,
            "resident_blocks": list(self.resident),
            "streamed_blocks": list(self.streamed),
            "ring_slots": self.ring_slots,
            "slot_bytes": self.slot_bytes,
            "accounted_bytes": dict(self.accounted),
        }


def _spread_rank(n: int) -> list[int]:
    """rank[i] of position i such that the first k positions by rank are spread evenly over 0..n-1
    (bit-reversed order): resident blocks between streamed ones give the copies more time to hide."""
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    rev = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(n)]
    order = sorted(range(n), key=lambda i: rev[i])
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def _candidates(sizes: Sequence[int], slots: int) -> list[tuple[list[int], list[int], int]]:
    """Every placement worth considering, as (resident sorted by preference, streamable, slot bytes).

    For a slot size s, blocks larger than s must be resident; those of size <= s may stream, and the
    resident ones among them are taken smallest first. Streaming needs more blocks than slots (with
    fewer, the slots would simply hold them: all-resident costs no more)."""
    rank = _spread_rank(len(sizes))
    out = []
    for s in sorted(set(sizes)):
        must = [i for i, b in enumerate(sizes) if b > s]
        optional = sorted((i for i, b in enumerate(sizes) if b <= s), key=lambda i: (sizes[i], rank[i]))
        if len(optional) > slots:
            out.append((must, optional, s))
    return out


def plan_blocks(
    sizes: Sequence[int],
    budget_bytes: int,
    *,
    fixed_bytes: int = 0,
    activation_bytes: int = 0,
    scratch_bytes: int = 0,
    context_bytes: int = 0,
    margin_bytes: int = 0,
    prefetch_depth: int = 1,
    what: str = "model",
    fallback_bytes: int = 0,
) -> Plan:
    """Keep as many blocks resident as fit in `budget_bytes`, stream the rest (module docstring).

    Raises UsageError naming the minimum budget when nothing fits. The minimum is exact: a budget of
    `plan.minimum_bytes` plans, one byte less does not. `margin_bytes`: kept free for the allocator's
    rounding and fragmentation (budget.allocator_margin)."""
    if prefetch_depth < 1:
        raise UsageError(f"prefetch depth must be >= 1 (got {prefetch_depth})")
    sizes = [int(b) for b in sizes]
    slots = prefetch_depth + 1
    base = {"context": context_bytes, "allocator_margin": margin_bytes, "fixed_weights": fixed_bytes,
            "activations": activation_bytes, "dequant_scratch": scratch_bytes,
            "fp32_fallback": fallback_bytes}  # fmt: skip
    overhead = sum(base.values())
    candidates = _candidates(sizes, slots)
    weights = lambda resident, s: sum(sizes[i] for i in resident) + slots * s
    # the cheapest placement: everything resident, or for some slot size only the larger blocks
    cheapest = min([(sum(sizes), len(sizes), 0)] + [(weights(m, s), len(m), s) for m, _, s in candidates])
    minimum = overhead + cheapest[0]
    if overhead + sum(sizes) <= budget_bytes:  # everything resident
        best = (list(range(len(sizes))), [], 0)
    else:
        options = []
        for must, optional, s in candidates:
            free = budget_bytes - overhead - weights(must, s)
            if free < 0:
                continue
            k = 0  # resident blocks taken from `optional`, smallest first; at least slots+1 stream
            while k < len(optional) - slots - 1 and sizes[optional[k]] <= free:
                free -= sizes[optional[k]]
                k += 1
            options.append((must + optional[:k], optional[k:], s))
        if not options:
            parts = [f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in base.items() if v]
            parts += [f"{cheapest[1]} resident blocks", f"{slots} ring slots of {format_bytes(cheapest[2])}"]
            raise UsageError(
                f"VRAM budget {format_bytes(budget_bytes, 2)} is below the minimum "
                f"{format_bytes(minimum, 2)} for the {what} ({', '.join(parts)})"
            )
        # most blocks resident; among those, the fewest device bytes
        best = max(options, key=lambda o: (len(o[0]), -weights(o[0], o[2])))
    resident, streamed, slot_bytes = best
    n_slots = slots if streamed else 0
    accounted = {**base, "resident_blocks": sum(sizes[i] for i in resident), "ring": n_slots * slot_bytes}
    return Plan(budget_bytes, tuple(sizes), tuple(sorted(resident)), tuple(sorted(streamed)), n_slots,
                slot_bytes, accounted, minimum, what)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Activation and scratch estimates: the one place where memory per resolution is written down.
# Upper bounds in bytes for one forward (inference, no autograd), from the model code's live tensors.


def dit_tokens(cfg: DiTConfig, width: int, height: int, caption_tokens: int = 512) -> tuple[int, int]:
    """(image tokens, caption tokens), each padded to the model's sequence multiple (32)."""
    p = 8 * cfg.patch_size  # VAE factor 8, then patch 2: one token per 16x16 pixels
    image = math.ceil(height / p) * math.ceil(width / p)
    return _round_up(image, cfg.seq_multiple), _round_up(max(caption_tokens, 1), cfg.seq_multiple)


def dit_activation_bytes(
    cfg: DiTConfig,
    width: int,
    height: int,
    batch: int,
    dtype: torch.dtype,
    caption_tokens: int = 512,
    attention: str = "efficient",
    chunks: int = 1,
) -> int:
    """Peak activation bytes of ZImageDiT.forward (S = image + caption tokens, D = dim, F = FFN dim):

    live for the whole forward: the joint sequence h plus the image and caption streams still held by
        the forward's locals: 3*S*D*w (w = bytes of models/numerics.wide_dtype: 4 for fp16, else e,
        the compute dtype's bytes)
    inside a block, the larger of
        attention: normed input, qkv (3), q/k/v after norm + RoPE (3), SDPA output, out projection
            = 9*S*D*e, plus two float32 S*D temporaries of RMSNorm/RoPE (they upcast): 2*S*D*4;
            "math" SDPA (no fused kernel: fp32 sm 6.x without mem-efficient attention, or masks on
            some builds) adds scores and probabilities: 2*heads*S*S*e; fp16 adds the out projection's
            scaled input S*D*e and its float32 output and unscaled copy 2*S*D*4 (numerics.linear_wide)
        FFN: normed input S*D*e plus w1->silu, w3 and their product: 3*S*F*e; fp16 (product in
            float32, in place) adds the scaled w2 input S*F*e and w2's float32 output and its unscaled
            copy 2*S*D*4 (numerics.linear_wide; QuantLinear's 1/128 copy is the fourth S*F*e)
    RoPE tables: complex64 (S, head_dim/2) for the image, caption and joint sequences.
    Everything scales with the batch, the inside of a block with the part of the batch it runs at once
    (`chunks`: ZImageDiT.forward's; a CFG batch of 2B in 2 chunks holds one pass's block temporaries).
    """
    if attention not in ATTENTION_KINDS:
        raise UsageError(f"unknown attention kind {attention!r} (choose {', '.join(ATTENTION_KINDS)})")
    e = torch.empty((), dtype=dtype).element_size()
    w = 4 if dtype == torch.float16 else e
    image, caption = dit_tokens(cfg, width, height, caption_tokens)
    s, d, f = image + caption, cfg.dim, cfg.ffn_dim
    live = 3 * s * d * w
    attn = 9 * s * d * e + 2 * s * d * 4
    if attention == "math":
        attn += 2 * cfg.n_heads * s * s * e
    ffn = s * d * e + 3 * s * f * e
    if dtype == torch.float16:
        attn += s * d * e + 2 * s * d * 4
        ffn += s * f * e + 2 * s * d * 4
    freqs = 3 * s * (cfg.head_dim // 2) * 8
    return batch * (live + freqs) + -(-batch // max(chunks, 1)) * max(attn, ffn)


def qwen3_activation_bytes(cfg: Qwen3Config, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Peak activation bytes of Qwen3Encoder.forward_embeddings over `tokens` tokens (S):

    live: the embedded input and the hidden state: S*D*e + S*D*w (w: 4 for fp16, whose residual stream
        is float32, else e)
    attention: q, k, v repeated to the query heads (GQA), two RoPE temporaries and the output:
        6*S*Q*e (Q = heads*head_dim), q/k RMSNorm float32 temporaries 2*S*Q*4, a padding mask and
        math-SDPA scores 2*heads*S*S*e (small at S <= 512, accounted always)
    FFN: normed input S*D*e plus gate->silu, up and their product 3*S*F*e
    fp16 adds to each the output projection's scaled input (S*Q*e or S*F*e) and its float32 output and
        unscaled copy 2*S*D*4 (numerics.linear_wide), as in the DiT
    RoPE cos/sin: 2*S*head_dim*e.
    """
    e = torch.empty((), dtype=dtype).element_size()
    w = 4 if dtype == torch.float16 else e
    s, d, f = tokens, cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    attn = 6 * s * q * e + 2 * s * q * 4 + 2 * cfg.num_attention_heads * s * s * e + s * s
    ffn = s * d * e + 3 * s * f * e
    if dtype == torch.float16:
        attn += s * q * e + 2 * s * d * 4
        ffn += s * f * e + 2 * s * d * 4
    return batch * (s * d * e + s * d * w + max(attn, ffn) + 2 * s * cfg.head_dim * e)


def dequant_scratch_bytes(modules: Iterable[nn.Module], dtype: torch.dtype, torch_path: bool = False) -> int:
    """Bytes to dequantize the largest quantized linear among `modules` (QuantLinear) to `dtype`.

    The Triton path writes the dense weight once (out*in*e). The torch reference path (sm < 8.0, CPU)
    decodes through float32 intermediates: two more float32 copies (out*in*8) are accounted."""
    from zimage_lite.runtime.quant_linear import QuantLinear

    e = torch.empty((), dtype=dtype).element_size()
    per_weight = e + (8 if torch_path else 0)
    largest = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, QuantLinear):
                largest = max(largest, m.in_features * m.out_features)
    return largest * per_weight


# ---------------------------------------------------------------------------------------------------
# Model-level planning: the block lists and the glue from a model to `plan_blocks`.


def largest_half_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the largest float16 parameter or buffer of `model` (dense weights, not quantized bytes)."""
    sizes = [t.nbytes for _, _, t in block_tensors(model) if t.dtype == torch.float16]
    return max(sizes, default=0)


def fp32_fallback_bytes(model: nn.Module, activations: int, scratch: int, fp32_activations: int,
                        fp32_scratch: int) -> int:  # fmt: skip
    """Extra bytes of a step redone with float32 compute (runtime/fp32_fallback.py) beyond the float16
    working set (`activations` + `scratch`): float32 activations, dequantization to float32, and the
    float32 copy of the largest dense float16 weight, made at its use (4 bytes per element)."""
    upcast = 2 * largest_half_tensor_bytes(model)
    return max(0, fp32_activations + fp32_scratch + upcast - activations - scratch)


def dit_blocks(model: nn.Module, controlnet: nn.Module | None = None) -> list[nn.Module]:
    """ZImageDiT's blocks in execution order: noise_refiner, context_refiner, then layers; with a
    ControlNet its blocks interleaved where a controlled forward runs them."""
    if controlnet is not None:
        from zimage_lite.models.controlnet import execution_order

        return execution_order(model, controlnet)
    return [*model.noise_refiner, *model.context_refiner, *model.layers]


def transformer_root(model: nn.Module, controlnet: nn.Module | None = None) -> nn.Module:
    """What the transformer phase places: the DiT, and the ControlNet beside it when there is one."""
    return model if controlnet is None else nn.ModuleList([model, controlnet])


def qwen3_blocks(model: nn.Module) -> list[nn.Module]:
    """Qwen3Encoder's decoder layers (its embedding table is gathered on the CPU, never planned)."""
    return list(model.layers)


def qwen3_host_only(model: nn.Module) -> list[nn.Module]:
    """The embedding table: 389M parameters in the real model, of which a prompt needs a few rows."""
    return [model.embed_tokens]


def outside_tensors(
    root: nn.Module, blocks: Sequence[nn.Module], host_only: Sequence[nn.Module] = ()
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer of `root` that is neither inside `blocks` nor inside `host_only`
    (modules that stay on the host, like the text encoder's embedding table, gathered there): what a
    phase places on the device beside its blocks, packed into one buffer (the streamer's `fixed`)."""
    skip = {id(t) for b in [*blocks, *host_only] for _, _, t in block_tensors(b)}
    return [(m, name, t) for m, name, t in block_tensors(root) if id(t) not in skip]


def fixed_bytes(root: nn.Module, blocks: Sequence[nn.Module], host_only: Sequence[nn.Module] = ()) -> int:
    """Device bytes of `outside_tensors` packed into one buffer, exactly what the streamer allocates."""
    return packed_layout([t.nbytes for _, _, t in outside_tensors(root, blocks, host_only)])[1]


def plan_transformer(
    model: nn.Module,
    budget_bytes: int,
    width: int,
    height: int,
    batch: int = 1,
    dtype: torch.dtype | None = None,
    *,
    caption_tokens: int = 512,
    context_bytes: int = 0,
    margin_bytes: int = 0,
    prefetch_depth: int = 1,
    attention: str = "efficient",
    torch_dequant: bool = False,
    chunks: int = 1,
    controlnet: nn.Module | None = None,
) -> Plan:
    """Plan ZImageDiT (loaded or meta-built) at width x height for `batch` images in `dtype`
    (default: the model's), each block running the batch in `chunks` parts. Blocks are
    `dit_blocks(model, controlnet)`; all other weights are always resident. A ControlNet adds its
    control stream and one live hint (whole batch) to the activations."""
    dtype = dtype or model.dtype
    blocks = dit_blocks(model, controlnet)
    root = transformer_root(model, controlnet)

    def activations_in(dt: torch.dtype) -> int:
        n = dit_activation_bytes(model.config, width, height, batch, dt, caption_tokens, attention, chunks)
        if controlnet is not None:
            from zimage_lite.models.controlnet import live_hint_bytes

            tokens = sum(dit_tokens(model.config, width, height, caption_tokens))
            n += live_hint_bytes(controlnet.config, tokens, batch, torch.empty((), dtype=dt).element_size())
        return n

    activations = activations_in(dtype)
    scratch = dequant_scratch_bytes([root], dtype, torch_dequant)
    fallback = 0
    if dtype == torch.float16:  # a non-finite step is redone with float32 compute (fp32_fallback.py)
        fp32_scratch = dequant_scratch_bytes([root], torch.float32, torch_dequant)
        fallback = fp32_fallback_bytes(
            root, activations, scratch, activations_in(torch.float32), fp32_scratch
        )
    return plan_blocks(
        [block_bytes(b) for b in blocks],
        budget_bytes,
        fixed_bytes=fixed_bytes(root, blocks),
        activation_bytes=activations,
        scratch_bytes=scratch,
        fallback_bytes=fallback,
        context_bytes=context_bytes,
        margin_bytes=margin_bytes,
        prefetch_depth=prefetch_depth,
        what=f"transformer{'' if controlnet is None else ' + ControlNet'} at {width}x{height} batch {batch}"
        + (f" in {chunks} parts" if chunks > 1 else ""),
    )


def plan_text_encoder(
    model: nn.Module,
    budget_bytes: int,
    tokens: int = 512,
    batch: int = 1,
    dtype: torch.dtype | None = None,
    *,
    context_bytes: int = 0,
    margin_bytes: int = 0,
    prefetch_depth: int = 1,
    torch_dequant: bool = False,
) -> Plan:
    """Plan Qwen3Encoder's layers; the embedding table stays on the CPU (gather there, then move the
    (B, S, hidden) embeddings), so it is not accounted (`qwen3_host_only`)."""
    blocks = qwen3_blocks(model)
    dtype = dtype or model.layers[0].input_layernorm.weight.dtype
    return plan_blocks(
        [block_bytes(b) for b in blocks],
        budget_bytes,
        fixed_bytes=fixed_bytes(model, blocks, qwen3_host_only(model)),
        activation_bytes=qwen3_activation_bytes(model.config, tokens, batch, dtype),
        scratch_bytes=dequant_scratch_bytes(blocks, dtype, torch_dequant),
        context_bytes=context_bytes,
        margin_bytes=margin_bytes,
        prefetch_depth=prefetch_depth,
        what=f"text encoder ({tokens} tokens, batch {batch})",
    )
