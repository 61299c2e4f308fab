"""CFG under a VRAM budget on the CPU ledger: the positive and negative passes share each streamed block
(host-to-device bytes per step within 5% of a guidance-free run), the planner counts the doubled
activations, and the two ways of running the passes (one batch, or one after the other inside each
block) give the same latents."""

from __future__ import annotations

import torch

from zimage_lite.guidance import Guidance, guided
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.device import DeviceLedger, device_layer_for
from zimage_lite.runtime.phases import plan_cfg_transformer
from zimage_lite.runtime.planner import dit_activation_bytes, dit_blocks, outside_tensors, plan_transformer
from zimage_lite.runtime.streamer import BlockStreamer
from zimage_lite.sampling import euler_sample, initial_noise

MB = 1 << 20
STEPS = 3


def _h2d_per_step(quantized, vram, guidance):
    pipe = Pipeline.load(quantized, device="cpu", vram=vram)
    latents = pipe.generate_latents(
        "a harbour at night",
        seed=4,
        width=64,
        height=48,
        steps=STEPS,
        guidance=guidance,
        negative_prompt="fog",
    )
    s = pipe.last_stats.to_dict()["streaming"]
    return s["transformer"]["h2d_bytes"] / STEPS, s, latents


def test_cfg_uploads_each_block_once_per_step(quantized):
    """At 14 MB both runs stream the same blocks (at 15 MB the guidance-free run keeps every block
    resident, the guided one cannot: doubled activations cost resident blocks, not uploads per block)."""
    plain, _, _ = _h2d_per_step(quantized, 14 * MB, 0.0)
    cfg, stats, _ = _h2d_per_step(quantized, 14 * MB, 4.0)
    assert stats["plans"]["transformer"]["streamed_blocks"]  # the blocks do stream at this budget
    assert stats["transformer"]["prefetch_misses"] == 0
    assert plain > 0 and abs(cfg - plain) <= 0.05 * plain


def test_streamer_sees_one_upload_per_block_in_both_pass_modes(quantized):
    """At the smallest budget every block streams; a guided step (one batch of two, or the two passes one
    after the other in each block) uploads what an unguided step uploads."""
    pipe = Pipeline.load(quantized, device="cpu")
    model = pipe.transformer
    blocks = dit_blocks(model)
    smallest = plan_transformer(model, 1 << 62, 48, 48, batch=2).minimum_bytes
    plan = plan_transformer(model, smallest, 48, 48, batch=2)
    assert len(plan.streamed) == len(blocks) - len(plan.resident) >= 3
    layer = device_layer_for(torch.device("cpu"), ledger=DeviceLedger(None))
    captions, negative = pipe.encode_prompts(["a cat"]), pipe.encode_prompts(["blurry, dark"])
    x = initial_noise(1, 16, 48, 48, seed=1)
    uploaded = {}
    with BlockStreamer(blocks, plan, layer, fixed=outside_tensors(model, blocks)) as streamer:
        for name, cfg, passes in (("plain", Guidance(0.0), 1), ("batch", Guidance(4.0), 1), ("one-by-one", Guidance(4.0), 2)):  # fmt: skip
            before = streamer.stats()["h2d_bytes"]
            euler_sample(guided(model, captions, negative, cfg, passes), x, 2)
            uploaded[name] = streamer.stats()["h2d_bytes"] - before
        assert streamer.stats()["prefetch_misses"] == 0
    assert uploaded["plain"] > 0
    assert uploaded["batch"] == uploaded["one-by-one"] == uploaded["plain"]


def test_planner_counts_the_doubled_activations(quantized):
    pipe = Pipeline.load(quantized, device="cpu")
    cfg = pipe.transformer.config
    one = dit_activation_bytes(cfg, 64, 48, 1, torch.float32, 64)
    two = dit_activation_bytes(cfg, 64, 48, 2, torch.float32, 64)
    halves = dit_activation_bytes(cfg, 64, 48, 2, torch.float32, 64, chunks=2)
    assert two == 2 * one and one < halves < two  # in halves: the joint sequences of both, one block's work
    plan, chunks = plan_cfg_transformer(
        pipe.transformer, 1 << 62, 64, 48, images=1, cfg=True, caption_tokens=64
    )
    assert chunks == 1 and plan.accounted["activations"] == two
    plan, chunks = plan_cfg_transformer(
        pipe.transformer, 1 << 62, 64, 48, images=1, cfg=False, caption_tokens=64
    )
    assert chunks == 1 and plan.accounted["activations"] == one


def test_chunked_plan_gives_the_batched_latents(quantized):
    """14 MB does not fit a batch of two beside the ring, so the passes run one after the other; the
    latents are those of the unlimited (batched) run."""
    _, stats, chunked = _h2d_per_step(quantized, 14 * MB, 4.0)
    assert stats["plans"]["transformer_chunks"] == 2
    _, stats, batched = _h2d_per_step(quantized, None, 4.0)
    assert stats["plans"]["transformer_chunks"] == 1
    torch.testing.assert_close(chunked, batched, rtol=1e-4, atol=1e-4)
