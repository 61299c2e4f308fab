"""Block streaming on the CPU device layer: bit-identical outputs, every block computes from a freshly
loaded ring slot (proved by poisoning slots after use and by deliberately broken streamers), exact
host-to-device byte counts, and the device bytes the planner accounted."""

from __future__ import annotations

import pytest
import torch

from zimage_lite.config import DiTConfig, Qwen3Config
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.runtime.device import CpuDevice, device_layer_for
from zimage_lite.runtime.planner import (
    Plan,
    block_bytes,
    dit_blocks,
    outside_tensors,
    plan_blocks,
    qwen3_blocks,
)
from zimage_lite.runtime.quant_linear import swap_linears
from zimage_lite.runtime.streamer import BlockStreamer
from zimage_lite.synthetic import random_tensor
from zimage_lite.weights.load import build_meta, load_strict

DIT = DiTConfig(
    dim=64, n_layers=5, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12)
)
QWEN = Qwen3Config(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
)  # fmt: skip


def random_model(factory, seed=0):
    model = build_meta(factory)
    gen = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(k, tuple(v.shape), gen, torch.float32) for k, v in model.state_dict().items()}
    return load_strict(model, state, "test model").eval()


def dit_inputs(seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 10, generator=gen)
    return latents.to(device), [torch.randn(7, DIT.cap_feat_dim, generator=gen).to(device)]


@torch.no_grad()
def dit_steps(model, steps=(0.2, 0.7), device="cpu"):
    """Two 'sampling steps' (different t): the ring wraps from the last block to the first in between."""
    latents, caps = dit_inputs(device=device)
    return [model(latents, torch.tensor([t], device=device), caps) for t in steps]


def all_streamed(blocks, depth: int) -> Plan:
    sizes = tuple(block_bytes(b) for b in blocks)
    n = len(sizes)
    ring = {"resident_blocks": 0, "ring": (depth + 1) * max(sizes)}
    return Plan(1 << 40, sizes, (), tuple(range(n)), depth + 1, max(sizes), ring)


def equal_lists(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("budget_blocks", [None, 1, 2])
def test_streamed_dit_is_bit_identical(depth, budget_blocks):
    model = random_model(lambda: ZImageDiT(DIT))
    ref = dit_steps(model)
    blocks = dit_blocks(model)
    if budget_blocks is None:
        plan = all_streamed(blocks, depth)
    else:  # the planner's minimum plus room for a few resident blocks
        sizes = [block_bytes(b) for b in blocks]
        minimum = plan_blocks(sizes, 1 << 40, prefetch_depth=depth).minimum_bytes
        plan = plan_blocks(sizes, minimum + budget_blocks * max(sizes), prefetch_depth=depth)
        assert plan.streamed and len(plan.resident) >= 1
    streamer = BlockStreamer(blocks, plan, CpuDevice(), poison_after_use=True)
    with streamer:
        out = dit_steps(model)
        assert streamer.device_weight_bytes() == plan.accounted["resident_blocks"] + plan.accounted["ring"]
    assert equal_lists(out, ref)
    assert streamer.stats()["prefetch_misses"] == 0
    assert equal_lists(dit_steps(model), ref)  # detached: back on the host store, same numbers


def test_each_streamed_block_computes_from_a_ring_slot():
    model = random_model(lambda: ZImageDiT(DIT))
    blocks = dit_blocks(model)
    streamer = BlockStreamer(blocks, all_streamed(blocks, 1), CpuDevice())
    seen = []

    def check(i, module, args):
        slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer._slots]
        for p in module.parameters():
            assert any(lo <= p.data_ptr() < hi for lo, hi in slot_ranges), f"block {i}: weight not in a slot"
            host = streamer._blocks[i].host
            assert not host.data_ptr() <= p.data_ptr() < host.data_ptr() + host.numel()
        seen.append(i)

    with streamer:
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: check(i, m, a)) for i, b in enumerate(blocks)]
        dit_steps(model)
        for h in hooks:
            h.remove()
    assert seen == list(range(len(blocks))) * 2


class WrongSlotStreamer(BlockStreamer):
    """Binds each block to the slot after the right one: what a slot-mapping bug would do."""

    def _before(self, i, module, args):
        super()._before(i, module, args)
        self._blocks[i].bind(self._slots[(self._where[i] + 1) % len(self._slots)])


class SkippingDevice(CpuDevice):
    """Drops the copy of one load: the block would compute from a stale (poisoned) slot."""

    def __init__(self, skip: int):
        super().__init__()
        self.skip, self.n = skip, 0

    def copy_async(self, dst, src, after=None):
        self.n += 1
        if self.n == self.skip:
            return super().copy_async(dst[:0], src[:0], after)
        return super().copy_async(dst, src, after)


@pytest.mark.parametrize(
    "make", [lambda b, p: WrongSlotStreamer(b, p, CpuDevice()),
             lambda b, p: BlockStreamer(b, p, SkippingDevice(skip=9), poison_after_use=True)],
    ids=["wrong_slot", "stale_slot"],
)  # fmt: skip
def test_broken_streaming_is_caught(make):
    """The bit-identity check can fail: a wrong slot mapping or a missed reload changes the output."""
    model = random_model(lambda: ZImageDiT(DIT))
    ref = dit_steps(model)
    blocks = dit_blocks(model)
    with make(blocks, all_streamed(blocks, 1)):
        out = dit_steps(model)
    assert not equal_lists(out, ref)


def test_host_to_device_bytes_are_exact():
    model = random_model(lambda: ZImageDiT(DIT))
    blocks = dit_blocks(model)
    sizes = [block_bytes(b) for b in blocks]
    plan = Plan(1 << 40, tuple(sizes), (1, 4), (0, 2, 3, 5, 6), 2, max(sizes))
    streamer = BlockStreamer(blocks, plan, CpuDevice())
    with streamer:
        dit_steps(model, steps=(0.1, 0.4, 0.9))
        stats = streamer.stats()
    order = list(plan.streamed)
    loads = plan.ring_slots + 3 * len(order)  # primed slots, then one load per streamed forward
    assert stats["h2d_copies"] == loads
    assert stats["h2d_bytes"] == sum(sizes[order[j % len(order)]] for j in range(loads))
    assert stats["resident_load_bytes"] == sizes[1] + sizes[4]
    assert stats["pageable_host_bytes"] == sum(sizes[i] for i in order)
    assert stats["overlap_fraction"] == 0.0  # nothing overlaps on the CPU
    assert stats["prefetch_misses"] == 0


def test_quantized_blocks_stream_bit_identical():
    """Blocks holding QuantLinear raw bytes (uint8 Q8_0, float8 + 0-d float32 scale) stream unchanged."""
    model = random_model(lambda: ZImageDiT(DIT))
    qtypes = {}
    for prefix in [f"{n}.{i}" for n in ("noise_refiner", "context_refiner", "layers") for i in range(5)]:
        if prefix.startswith("layers") or prefix.endswith(".0"):
            for name in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w3"):
                qtypes[f"{prefix}.{name}"] = "Q8_0"
            qtypes[f"{prefix}.feed_forward.w2"] = "FP8_E4M3"  # in_features 170: not a multiple of 32
    swap_linears(model, qtypes, torch.float32)
    ref = dit_steps(model)
    blocks = dit_blocks(model)
    dtypes = {p.dtype for b in blocks for p in b.parameters()}
    assert {torch.uint8, torch.float8_e4m3fn, torch.float32} <= dtypes
    with BlockStreamer(blocks, all_streamed(blocks, 1), CpuDevice(), poison_after_use=True):
        out = dit_steps(model)
    assert equal_lists(out, ref)


@torch.no_grad()
def encode(model, ids):
    return model.forward_embeddings(model.embed_tokens(ids))


@pytest.mark.parametrize("cyclic", [True, False])
def test_text_encoder_streams_with_embeddings_on_the_host(cyclic):
    model = random_model(lambda: Qwen3Encoder(QWEN))
    prompts = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 23)]
    ref = [encode(model, ids) for ids in prompts]
    blocks = qwen3_blocks(model)
    streamer = BlockStreamer(
        blocks, all_streamed(blocks, 1), CpuDevice(), cyclic=cyclic, poison_after_use=True
    )
    with streamer:
        out = [encode(model, ids) for ids in prompts]
    assert equal_lists(out, ref)
    # without the cyclic prefetch the second prompt starts from an empty ring: one (correct) miss
    assert streamer.stats()["prefetch_misses"] == (0 if cyclic else 1)


def test_out_of_order_block_calls_stay_correct():
    model = random_model(lambda: Qwen3Encoder(QWEN))
    blocks = qwen3_blocks(model)
    x = torch.randn(1, 5, QWEN.hidden_size)
    from zimage_lite.models.qwen3 import rope_cos_sin

    cos, sin = rope_cos_sin(QWEN, 5, x.device, x.dtype)
    with torch.no_grad():
        ref = [b(x, cos, sin, None) for b in blocks]
        streamer = BlockStreamer(blocks, all_streamed(blocks, 1), CpuDevice(), poison_after_use=True)
        with streamer:
            out = [blocks[i](x, cos, sin, None) for i in (3, 0, 2, 1)]
    assert equal_lists(out, [ref[i] for i in (3, 0, 2, 1)])
    # block 3 first: one miss restarts the ring at 3 (3, 0 loaded); 0, 2, 1 then arrive through prefetch
    assert streamer.stats()["prefetch_misses"] == 1


def test_host_store_is_distinct_storage_and_built_once():
    model = random_model(lambda: ZImageDiT(DIT))
    blocks = dit_blocks(model)
    streamer = BlockStreamer(blocks, all_streamed(blocks, 1), CpuDevice())
    streamer.attach()
    hosts = [b.host for b in streamer._blocks]
    slot_ptrs = {s.untyped_storage().data_ptr() for s in streamer._slots}
    assert not slot_ptrs & {h.untyped_storage().data_ptr() for h in hosts}
    streamer.detach()
    streamer.attach()  # a re-attach reuses the host store
    assert all(a is b.host for a, b in zip(hosts, streamer._blocks))
    streamer.detach()


def test_plan_mismatch_and_outside_weights():
    model = random_model(lambda: ZImageDiT(DIT))
    blocks = dit_blocks(model)
    plan = all_streamed(blocks[:-1], 1)
    with pytest.raises(ValueError):
        BlockStreamer(blocks, plan, CpuDevice())
    outside = sum(t.nbytes for _, _, t in outside_tensors(model, blocks))
    every = sum(t.nbytes for t in model.state_dict().values())
    assert outside == every - sum(sum(t.nbytes for t in b.state_dict().values()) for b in blocks)
    no_embedder = outside_tensors(model, blocks, host_only=[model.x_embedder])
    assert outside - sum(t.nbytes for _, _, t in no_embedder) == sum(
        t.nbytes for t in model.x_embedder.state_dict().values()
    )
    assert isinstance(device_layer_for("cpu"), CpuDevice)


@pytest.mark.gpu
@pytest.mark.parametrize("pin", ["auto", "never"])
def test_cuda_streaming_matches_resident(pin):
    """On a GPU: side-stream copies into the ring give the same numbers as the resident model, through
    pinned memory or pageable memory with staging buffers; copies are timed and partly hidden."""
    import copy

    from zimage_lite.runtime.device import CudaDevice

    cuda = torch.device("cuda")
    model = random_model(lambda: ZImageDiT(DIT))
    ref = dit_steps(copy.deepcopy(model).to(cuda), steps=(0.1, 0.5, 0.9), device=cuda)
    blocks = dit_blocks(model)
    sizes = [block_bytes(b) for b in blocks]
    plan = Plan(1 << 40, tuple(sizes), (1,), (0, 2, 3, 4, 5, 6), 2, max(sizes))
    fixed = outside_tensors(model, blocks)
    streamer = BlockStreamer(blocks, plan, CudaDevice(cuda, pin=pin), fixed=fixed, poison_after_use=True)
    with streamer:
        out = dit_steps(model, steps=(0.1, 0.5, 0.9), device=cuda)
        stats = streamer.stats()
    assert equal_lists(out, ref)
    loads = plan.ring_slots + 3 * len(plan.streamed)
    assert stats["h2d_copies"] == loads and stats["copy_s"] > 0 and stats["prefetch_misses"] == 0
    assert (stats["pinned_host_bytes"] >= sum(sizes[i] for i in plan.streamed)) == (pin == "auto")


def test_generation_forced_to_stream_by_a_tiny_budget_is_bit_identical():
    """A whole 4-step Euler generation with the transformer planned at its minimum budget (most blocks
    streamed through 2 slots) gives the same latents, bit for bit, as the resident model."""
    from zimage_lite.runtime.planner import plan_transformer
    from zimage_lite.sampling import euler_sample, initial_noise

    model = random_model(lambda: ZImageDiT(DIT))
    caps = [torch.randn(9, DIT.cap_feat_dim, generator=torch.Generator().manual_seed(3))]
    noise = initial_noise(1, DIT.in_channels, 64, 80, seed=7)

    def generate():
        with torch.no_grad():
            return euler_sample(lambda x, t: model(x, t, caps), noise.clone(), 4)

    ref = generate()
    minimum = plan_transformer(model, 1 << 40, 80, 64, caption_tokens=9).minimum_bytes
    plan = plan_transformer(model, minimum, 80, 64, caption_tokens=9)
    assert len(plan.streamed) >= 3 and plan.ring_slots == 2
    with BlockStreamer(dit_blocks(model), plan, CpuDevice(), poison_after_use=True) as streamer:
        out = generate()
        assert (
            streamer.device_weight_bytes() + plan.accounted["fixed_weights"] + plan.accounted["activations"]
            <= plan.budget_bytes
        )
    assert torch.equal(out, ref)
