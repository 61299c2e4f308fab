"""The VRAM planner: accounting never exceeds the budget, the reported minimum is exact, the plan keeps
as many blocks resident as any placement could (brute force on small cases), and the estimates for the
real Z-Image shapes give the 4/6/8 GB plans the product promises."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zimage_lite.config import DiTConfig, Qwen3Config
from zimage_lite.errors import UsageError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.runtime.budget import DEFAULT_CUDA_CONTEXT_BYTES, GIB, MIB
from zimage_lite.runtime.planner import (
    ALIGN,
    block_bytes,
    dequant_scratch_bytes,
    dit_activation_bytes,
    dit_blocks,
    dit_tokens,
    packed_layout,
    plan_blocks,
    plan_text_encoder,
    plan_transformer,
    qwen3_activation_bytes,
)
from zimage_lite.runtime.quant_linear import swap_linears
from zimage_lite.weights.load import build_meta

sizes_st = st.lists(st.integers(1, 10**9), min_size=0, max_size=40)
overhead_st = st.integers(0, 2 * 10**9)


def kwargs(fixed, act, scratch, ctx, depth):
    return dict(fixed_bytes=fixed, activation_bytes=act, scratch_bytes=scratch, context_bytes=ctx,
                prefetch_depth=depth)  # fmt: skip


def check_plan(plan, sizes, budget):
    n = len(sizes)
    assert sorted(plan.resident + plan.streamed) == list(range(n))
    assert plan.total_bytes <= budget
    assert plan.accounted["resident_blocks"] == sum(sizes[i] for i in plan.resident)
    if plan.streamed:
        assert len(plan.streamed) > plan.ring_slots >= 2
        assert plan.slot_bytes == max(sizes[i] for i in plan.streamed)
        assert plan.accounted["ring"] == plan.ring_slots * plan.slot_bytes
    else:
        assert plan.ring_slots == 0 and plan.accounted["ring"] == 0


@settings(max_examples=300, deadline=None)
@given(
    sizes_st,
    st.integers(0, 40 * 10**9),
    overhead_st,
    overhead_st,
    overhead_st,
    overhead_st,
    st.integers(1, 3),
)
def test_plans_fit_the_budget_and_the_minimum_is_exact(sizes, budget, fixed, act, scratch, ctx, depth):
    kw = kwargs(fixed, act, scratch, ctx, depth)
    try:
        plan = plan_blocks(sizes, budget, **kw)
    except UsageError as exc:
        minimum = plan_blocks(sizes, 1 << 62, **kw).minimum_bytes
        assert budget < minimum
        assert "below the minimum" in str(exc) and "\n" not in str(exc)
    else:
        check_plan(plan, sizes, budget)
        minimum = plan.minimum_bytes
        assert minimum <= budget
    check_plan(plan_blocks(sizes, minimum, **kw), sizes, minimum)
    with pytest.raises(UsageError):
        plan_blocks(sizes, minimum - 1, **kw)


def brute_force_most_resident(sizes, budget, overhead, slots):
    """(the largest resident count over every subset, the fewest device bytes among those placements);
    streaming needs > slots streamed blocks."""
    n = len(sizes)
    for k in range(n, -1, -1):
        fits = []
        for resident in itertools.combinations(range(n), k):
            streamed = [i for i in range(n) if i not in resident]
            if streamed and len(streamed) <= slots:
                continue
            ring = slots * max((sizes[i] for i in streamed), default=0)
            if overhead + sum(sizes[i] for i in resident) + ring <= budget:
                fits.append(sum(sizes[i] for i in resident) + ring)
        if fits:
            return k, min(fits)
    return None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=0, max_size=8), st.integers(0, 900), st.integers(0, 50),
       st.integers(1, 2))  # fmt: skip
def test_resident_count_is_maximal_and_its_bytes_minimal(sizes, budget, overhead, depth):
    expected = brute_force_most_resident(sizes, budget, overhead, depth + 1)
    try:
        plan = plan_blocks(sizes, budget, fixed_bytes=overhead, prefetch_depth=depth)
    except UsageError:
        assert expected is None
    else:
        assert (len(plan.resident), plan.accounted["resident_blocks"] + plan.accounted["ring"]) == expected


def test_resident_blocks_are_spread_between_streamed_ones():
    plan = plan_blocks([100] * 8, 2 * 100 + 2 * 100, prefetch_depth=1)
    assert plan.resident == (0, 4)  # evenly spaced, not bunched at one end


def test_everything_resident_when_it_fits():
    plan = plan_blocks([10, 20, 30], 100, fixed_bytes=40)
    assert plan.resident == (0, 1, 2) and plan.streamed == () and plan.total_bytes == 100


def test_impossible_budget_message():
    with pytest.raises(UsageError) as info:
        plan_blocks([GIB] * 10, 2 * GIB, activation_bytes=GIB // 2, context_bytes=400 * MIB, what="thing")
    msg = str(info.value)
    assert msg.startswith("VRAM budget 2.00 GB is below the minimum 2.89 GB for the thing (")
    assert "activations 512 MB" in msg and "context 400 MB" in msg and "2 ring slots of 1.0 GB" in msg
    with pytest.raises(UsageError):
        plan_blocks([1, 2], 10, prefetch_depth=0)


def test_impossible_budget_message_names_the_cheapest_placement():
    """One large block and five small ones: the cheapest placement keeps the large block resident and
    streams the small ones through two 8 MB slots (1 GiB + 16 MiB, below all-resident 1 GiB + 40 MiB).
    With no other costs the list starts with the blocks (it once began with a stray ", ")."""
    with pytest.raises(UsageError) as info:
        plan_blocks([GIB] + [8 * MIB] * 5, GIB, what="thing")
    msg = str(info.value)
    assert "below the minimum 1.02 GB for the thing" in msg, msg
    assert msg.endswith("(1 resident blocks, 2 ring slots of 8 MB)"), msg


def test_packed_layout_aligns_every_tensor():
    offsets, total = packed_layout([3, 256, 1, 0, 513])
    assert offsets == [0, 256, 512, 768, 768] and total == 1536
    assert all(o % ALIGN == 0 for o in offsets)


# -- the real shapes (meta-built: no memory) -----------------------------------------------------------


@pytest.fixture(scope="module")
def full_dit():
    return build_meta(lambda: ZImageDiT(DiTConfig())).to(torch.bfloat16)


@pytest.fixture(scope="module")
def full_dit_q4():
    model = build_meta(lambda: ZImageDiT(DiTConfig())).to(torch.bfloat16)
    names = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    qtypes = {f"layers.{i}.{n}": "Q4_K" for i in range(30) for n in names}
    qtypes |= {
        f"{r}.{i}.{n}": "Q4_K" for r in ("noise_refiner", "context_refiner") for i in range(2) for n in names
    }
    swap_linears(model, qtypes, torch.bfloat16)
    return model


def test_dit_tokens_and_activation_formula():
    cfg = DiTConfig()
    assert dit_tokens(cfg, 1024, 1024) == (4096, 512)
    assert dit_tokens(cfg, 1008, 1024, caption_tokens=40) == (63 * 64, 64)
    base = dit_activation_bytes(cfg, 1024, 1024, 1, torch.bfloat16)
    assert dit_activation_bytes(cfg, 1024, 1024, 2, torch.bfloat16) == 2 * base
    assert dit_activation_bytes(cfg, 1024, 1024, 1, torch.float32) > base
    assert dit_activation_bytes(cfg, 1024, 1024, 1, torch.bfloat16, attention="math") > base + 2 * GIB
    assert dit_activation_bytes(cfg, 512, 512, 1, torch.bfloat16) < base
    # 1024x1024 bf16: the FFN intermediates (3 x 4608 x 10240 x 2 bytes) dominate: about half a GB
    assert 400 * MIB < base < 700 * MIB
    with pytest.raises(UsageError):
        dit_activation_bytes(cfg, 1024, 1024, 1, torch.bfloat16, attention="flashy")


@pytest.mark.parametrize("gb,min_resident", [(4, 1), (6, 10), (8, 17)])
def test_real_transformer_plans_on_small_cards(full_dit, full_dit_q4, gb, min_resident):
    kw = dict(context_bytes=DEFAULT_CUDA_CONTEXT_BYTES)
    bf16 = plan_transformer(full_dit, gb * GIB, 1024, 1024, **kw)
    q4 = plan_transformer(full_dit_q4, gb * GIB, 1024, 1024, **kw)
    assert bf16.total_bytes <= gb * GIB and q4.total_bytes <= gb * GIB
    assert len(bf16.resident) >= min_resident
    assert len(q4.resident) > len(bf16.resident)  # quantized blocks: more of them stay resident
    assert q4.accounted["dequant_scratch"] == 3 * 3840 * 3840 * 2  # the fused qkv dequantized to bf16
    n_blocks = len(dit_blocks(full_dit))
    assert len(bf16.resident) + len(bf16.streamed) == n_blocks == 34


def test_real_transformer_minimum_and_refusal(full_dit_q4):
    plan = plan_transformer(full_dit_q4, 8 * GIB, 1024, 1024, context_bytes=DEFAULT_CUDA_CONTEXT_BYTES)
    # Q4_K main block: ~181M weights at 4.5 bits + bf16 adaLN/norms
    assert 95 * MIB < max(plan.block_bytes) < 115 * MIB
    assert 1 * GIB < plan.minimum_bytes < 1.5 * GIB
    with pytest.raises(UsageError, match=r"for the transformer at 1024x1024 batch 1 \(context 400 MB"):
        plan_transformer(full_dit_q4, GIB, 1024, 1024, context_bytes=DEFAULT_CUDA_CONTEXT_BYTES)
    bigger = plan_transformer(
        full_dit_q4, 8 * GIB, 2048, 2048, batch=2, context_bytes=DEFAULT_CUDA_CONTEXT_BYTES
    )
    assert bigger.accounted["activations"] > 4 * plan.accounted["activations"]


def test_text_encoder_plan_keeps_embeddings_off_the_device():
    model = build_meta(lambda: Qwen3Encoder(Qwen3Config())).to(torch.bfloat16)
    plan = plan_text_encoder(model, 4 * GIB, tokens=512, context_bytes=DEFAULT_CUDA_CONTEXT_BYTES)
    assert plan.accounted["fixed_weights"] == 0  # the 778 MB embedding table stays on the CPU
    assert len(plan.block_bytes) == 35 and plan.streamed
    assert plan.block_bytes[0] == block_bytes(model.layers[0])
    assert plan.total_bytes <= 4 * GIB


def _q8_0_everywhere(model: torch.nn.Module) -> torch.nn.Module:
    linears = {n: "Q8_0" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    swap_linears(model, linears, torch.bfloat16)
    return model


@pytest.mark.parametrize("gb", [4, 6, 8])
def test_real_q8_0_model_plans_inside_each_card_with_a_margin(gb):
    """On the H200, a 4 GB card's text-encoder plan used 4.23 of 4.29 GB and died in the allocator.
    Every phase of the full q8_0 model now plans inside the card with the allocator's margin free."""
    from zimage_lite.config import VAEConfig
    from zimage_lite.models.vae import VAE
    from zimage_lite.runtime.budget import CARD_CONTEXT_BYTES, VramBudget, allocator_margin
    from zimage_lite.runtime.phases import plan_phases

    te = _q8_0_everywhere(build_meta(lambda: Qwen3Encoder(Qwen3Config())).to(torch.bfloat16))
    dit = _q8_0_everywhere(build_meta(lambda: ZImageDiT(DiTConfig())).to(torch.bfloat16))
    vae = build_meta(lambda: VAE(VAEConfig())).to(torch.bfloat16)
    card = gb * GIB
    budget = VramBudget(card, CARD_CONTEXT_BYTES, "card", allocator_margin(card))
    plans = plan_phases(te, dit, vae, budget, torch.device("cpu"), width=1024, height=1024, images=1,
                        caption_tokens=512, dtype=torch.bfloat16)  # fmt: skip
    for name in ("text_encoder", "transformer", "vae"):
        plan = plans.of(name)
        assert plan.accounted["allocator_margin"] >= 128 * MIB
        assert plan.total_bytes <= card  # context + margin + weights + activations
    assert not plans.keep  # 6.5 GB of q8_0 blocks + 4 GB of text encoder: each phase gives back
    assert bool(plans.transformer.streamed) == (gb < 8)  # on 8 GB the transformer phase holds it all


def test_every_argument_reaches_the_transformer_plan(full_dit_q4):
    """plan_transformer's options land in the plan, each where it belongs (not the defaults)."""
    cfg, bf16 = full_dit_q4.config, torch.bfloat16
    plan = plan_transformer(full_dit_q4, 4 * GIB, 768, 512, 2, caption_tokens=300, context_bytes=300 * MIB,
                            margin_bytes=77 * MIB, prefetch_depth=2, attention="math", torch_dequant=True)  # fmt: skip
    acc = plan.accounted
    assert acc["activations"] == dit_activation_bytes(
        cfg, 768, 512, 2, bf16, caption_tokens=300, attention="math"
    )
    assert acc["dequant_scratch"] == dequant_scratch_bytes([full_dit_q4], bf16, torch_path=True)
    assert acc["dequant_scratch"] > dequant_scratch_bytes([full_dit_q4], bf16)
    assert (acc["context"], acc["allocator_margin"], plan.ring_slots) == (300 * MIB, 77 * MIB, 3)
    assert plan.what == "transformer at 768x512 batch 2"
    assert plan_transformer(full_dit_q4, 4 * GIB, 768, 512).accounted["activations"] == dit_activation_bytes(
        cfg, 768, 512, 1, bf16
    )  # defaults: the model's dtype, batch 1, 512 caption tokens, fused attention


def test_every_argument_reaches_the_text_encoder_plan():
    model = _q8_0_everywhere(build_meta(lambda: Qwen3Encoder(Qwen3Config())).to(torch.bfloat16))
    cfg, bf16 = model.config, torch.bfloat16
    plan = plan_text_encoder(model, 3 * GIB, tokens=300, batch=2, context_bytes=300 * MIB, margin_bytes=77 * MIB,
                             prefetch_depth=2, torch_dequant=True)  # fmt: skip
    acc = plan.accounted
    assert acc["activations"] == qwen3_activation_bytes(cfg, 300, 2, bf16)
    blocks = list(model.layers)
    assert acc["dequant_scratch"] == dequant_scratch_bytes(blocks, bf16, torch_path=True)
    assert acc["dequant_scratch"] > dequant_scratch_bytes(blocks, bf16)
    assert (acc["context"], acc["allocator_margin"], plan.ring_slots) == (300 * MIB, 77 * MIB, 3)
    assert plan.what == "text encoder (300 tokens, batch 2)"
    assert plan_text_encoder(model, 3 * GIB).accounted["activations"] == qwen3_activation_bytes(
        cfg, 512, 1, bf16
    )


def test_plan_as_stats_json():
    """The keys `--stats` reports under streaming.plans (what gpu_check and the bench read)."""
    plan = plan_blocks([100] * 8, 2 * 100 + 2 * 100 + 50, fixed_bytes=50, prefetch_depth=1, what="thing")
    assert plan.to_dict() == {
        "budget_bytes": 450, "minimum_bytes": 250, "total_bytes": 450, "resident_blocks": [0, 4],
        "streamed_blocks": [1, 2, 3, 5, 6, 7], "ring_slots": 2, "slot_bytes": 100,
        "accounted_bytes": {"context": 0, "allocator_margin": 0, "fixed_weights": 50, "activations": 0,
                            "dequant_scratch": 0, "fp32_fallback": 0, "resident_blocks": 200, "ring": 200},
    }  # fmt: skip
    assert plan.summary() == (
        "thing: 2 blocks resident, 6 streamed through 2 slots of 100 B; 450 B of 450 B "
        "(fixed_weights 50 B, resident_blocks 200 B, ring 200 B)"
    )
