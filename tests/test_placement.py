"""Where every weight lives, phase by phase, and what each phase leaves on the device (CPU view).

The CPU device layer backs each device buffer with memory its ledger tracks until torch frees it, so
"on the device" and "still allocated" are facts the tests can read without a GPU. These are the two
bugs the first GPU run found: weights of a resident model left on the host, and phases that kept
their device buffers after they ended.
"""

from __future__ import annotations

import gc

import pytest
import torch

from zimage_lite.errors import DeviceMemoryError, UsageError
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.device import DeviceLedger
from zimage_lite.runtime.phases import phase_models
from zimage_lite.synthetic import write_synthetic_model

MB = 1 << 20
SIZE = dict(width=64, height=48, steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("placement") / "tiny", "tiny", seed=0)


def placed_tensors(pipe: Pipeline) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every parameter and buffer each phase places on the device (host-only modules excluded)."""
    out = {}
    for name, m in phase_models(pipe.text_encoder, pipe.transformer, pipe.vae).items():
        host = {id(t) for h in m.host_only for t in [*h.parameters(), *h.buffers()]}
        tensors = [*m.root.named_parameters(), *m.root.named_buffers()]
        out[name] = [(n, t) for n, t in tensors if id(t) not in host]
    return out


def off_device(pipe: Pipeline, names=("text_encoder", "transformer", "vae")) -> list[str]:
    placed = placed_tensors(pipe)
    return [f"{p}.{n}" for p in names for n, t in placed[p] if not pipe.runtime.on_device(t)]


def on_device(pipe: Pipeline) -> list[str]:
    placed = placed_tensors(pipe)
    return [f"{p}.{n}" for p, ts in placed.items() for n, t in ts if pipe.runtime.on_device(t)]


def test_load_places_nothing(tiny):
    pipe = Pipeline.load(tiny, device="cpu")
    assert on_device(pipe) == [] and pipe.runtime.layer.allocated_bytes() == 0


def test_resident_run_places_every_weight_and_keeps_it(tiny):
    """No budget: the plan under an unlimited budget. During the transformer phase every one of its
    weights is on the device; afterwards all three models stay there (keep), except the embedding
    table, which is gathered on the host."""
    pipe = Pipeline.load(tiny, device="cpu")
    seen = []
    done = ("text_encoder", "transformer")  # the phases that ran by the time a step ends
    pipe.generate("a lighthouse", seed=1, **SIZE, on_step=lambda i, n: seen.append(off_device(pipe, done)))
    assert seen == [[], []]
    assert pipe.last_stats.streaming["plans"]["keep"] is True
    assert off_device(pipe) == []
    assert not pipe.runtime.on_device(pipe.text_encoder.embed_tokens.weight)


def test_budget_run_gives_every_phase_back(tiny):
    pipe = Pipeline.load(tiny, device="cpu", vram="5MB")  # holds each phase, not all three at once
    seen = []
    pipe.generate("a lighthouse", seed=1, **SIZE, on_step=lambda i, n: seen.append(on_device(pipe)))
    assert pipe.last_stats.streaming["plans"]["keep"] is False
    assert seen[0] and all(n.startswith("transformer.") for n in seen[0])  # only the phase's own
    gc.collect()
    assert on_device(pipe) == [] and pipe.runtime.layer.allocated_bytes() == 0


@pytest.mark.parametrize("vram", [None, "5MB", "4GB"])
def test_ledger_over_two_images(tiny, vram):
    """Each phase stays within the budget; under a budget that cannot hold all phases at once each
    phase gives back exactly what it took; with room for everything nothing is placed twice."""
    pipe = Pipeline.load(tiny, device="cpu", vram=vram)
    memory, h2d = [], []
    for seed in (1, 2):
        pipe.generate("a lighthouse", seed=seed, **SIZE)
        memory.append(dict(pipe.last_stats.device_memory))
        streaming = pipe.last_stats.streaming
        h2d.append(sum(streaming[p]["h2d_bytes"] + streaming[p]["resident_load_bytes"] for p in memory[-1]))
    budget = pipe.budget.total_bytes
    for phases in memory:
        assert set(phases) == {"text_encoder", "transformer", "vae"}
        for m in phases.values():
            assert m["before"] <= m["peak"] and (budget is None or m["peak"] <= budget)
    if pipe.last_stats.streaming["plans"]["keep"]:
        assert h2d[1] == 0 and memory[1]["text_encoder"]["before"] == memory[0]["vae"]["after"] > 0
        assert memory[1]["vae"]["after"] == memory[0]["vae"]["after"]
    else:
        for phases in memory:
            assert all(m["before"] == m["after"] == 0 for m in phases.values())
        assert h2d[0] == h2d[1] > 0


def test_kept_and_given_back_images_are_identical(tiny):
    kept = Pipeline.load(tiny, device="cpu")
    streamed = Pipeline.load(tiny, device="cpu", vram="5MB")
    for seed in (3, 4):
        a = kept.generate_latents("a harbour", seed=seed, **SIZE)
        b = streamed.generate_latents("a harbour", seed=seed, **SIZE)
        assert torch.equal(a, b)
        assert kept.decode(a)[0].tobytes() == streamed.decode(b)[0].tobytes()


def test_card_emulation_caps_the_ledger(tiny):
    """A 5 MB card holds each phase but not all three: the ledger refuses any allocation past 5 MB, so
    a phase that kept its buffers would make the next one fail."""
    pipe = Pipeline.load(tiny, device="cpu", card="5MB")
    assert pipe.budget.source == "card" and pipe.runtime.layer.ledger.capacity == 5 * MB
    for seed in (1, 2):
        pipe.generate("a lighthouse", seed=seed, **SIZE)
        assert max(m["peak"] for m in pipe.last_stats.device_memory.values()) <= 5 * MB
    with pytest.raises(UsageError, match="larger than the emulated --card"):
        Pipeline.load(tiny, device="cpu", card="5MB", vram="6MB")


def test_ledger_counts_until_the_storage_is_freed():
    ledger = DeviceLedger(capacity=1000)
    buf = ledger.alloc(600)
    param = torch.nn.Parameter(torch.zeros(4))
    param.data = buf[64:80].view(torch.float32)  # how the streamer binds weights
    del buf
    gc.collect()
    assert ledger.live == 600 and ledger.holds(param)  # the parameter still points into it
    with pytest.raises(DeviceMemoryError, match="out of device memory"):
        ledger.alloc(500)
    param.data = torch.zeros(4)
    gc.collect()
    assert ledger.live == 0 and ledger.peak == 600 and not ledger.holds(param)


def test_load_strict_leaves_tensors_where_they_are():
    """The first GPU crash: `load_strict` moved every tensor of a device load back to a default
    "cpu". Tensors on another device (meta here, which cannot be copied to the host) stay there."""
    from zimage_lite.weights.load import build_meta, load_strict

    model = build_meta(lambda: torch.nn.Linear(4, 3))
    tensors = {"weight": torch.empty(3, 4, device="meta"), "bias": torch.empty(3, device="meta")}
    load_strict(model, tensors, "test")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_larger_image_gives_back_what_a_smaller_one_kept(tiny):
    """At 32x32 all phases fit an 8 MB card together (kept); at 80x80 they do not, so the weights
    kept by the first image go back before the second starts (the card's ledger would refuse)."""
    pipe = Pipeline.load(tiny, device="cpu", card="8MB")
    pipe.generate("a lighthouse", seed=1, width=32, height=32, steps=1)
    assert pipe.last_stats.streaming["plans"]["keep"] and pipe.runtime.layer.allocated_bytes() > 0
    pipe.generate("a lighthouse", seed=1, width=80, height=80, steps=1)
    assert not pipe.last_stats.streaming["plans"]["keep"]
    assert pipe.last_stats.device_memory["text_encoder"]["before"] == 0
    gc.collect()
    assert pipe.runtime.layer.allocated_bytes() == 0
