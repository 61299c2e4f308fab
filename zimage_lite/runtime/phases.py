"""The phases of a generation on the device: one placement path for every budget.

`plan_phases` plans the text encoder, the transformer and the VAE decode before any work starts, so an
impossible budget is refused with the minimum it needs instead of failing mid-run. With no budget the
plans are made against an unlimited one: "resident" is not a second code path, it is the plan under a
budget large enough for everything. `PhasePlans.keep` says whether all phases fit on the device at once;
then each phase keeps its weights there across phases and images (the second image reloads nothing),
otherwise each phase gives back everything it placed when it ends.

`DeviceRuntime.phase(name, plan)` runs one phase: the model's blocks through a BlockStreamer (resident or
streamed per the plan) and its other weights as the streamer's fixed tensors, the planner's activation
estimate reserved in the device ledger while it runs, and the device memory before / at peak / after
recorded under the phase's name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from zimage_lite.errors import UsageError
from zimage_lite.runtime.budget import VramBudget
from zimage_lite.runtime.device import DeviceLedger, device_layer_for
from zimage_lite.runtime.planner import (
    UNLIMITED,
    Plan,
    dit_blocks,
    fixed_bytes,
    outside_tensors,
    plan_blocks,
    plan_text_encoder,
    plan_transformer,
    qwen3_blocks,
    qwen3_host_only,
    transformer_root,
)
from zimage_lite.runtime.streamer import BlockStreamer
from zimage_lite.runtime.vae_tiling import choose_vae_tile, decode_bytes, encode_bytes

log = logging.getLogger(__name__)

COUNTERS = ("h2d_bytes", "h2d_copies", "copy_s", "stall_s", "resident_load_bytes", "prefetch_misses")


@dataclass(frozen=True)
class PhaseModel:
    """What one phase places: `root`'s weights, `blocks` of it planned one by one (streamable), the
    rest as fixed weights except `host_only` modules, which stay in host memory."""

    root: nn.Module
    blocks: Sequence[nn.Module] = ()
    host_only: Sequence[nn.Module] = ()


def phase_models(
    text_encoder: nn.Module, transformer: nn.Module, vae: nn.Module, controlnet: nn.Module | None = None
) -> dict[str, PhaseModel]:
    """A ControlNet is placed and streamed in the transformer's phase, its blocks in execution order."""
    return {
        "text_encoder": PhaseModel(text_encoder, qwen3_blocks(text_encoder), qwen3_host_only(text_encoder)),
        "transformer": PhaseModel(
            transformer_root(transformer, controlnet), dit_blocks(transformer, controlnet)
        ),
        "vae": PhaseModel(vae.decoder),
        "vae_encoder": PhaseModel(vae.encoder),
    }


@dataclass(frozen=True)
class PhasePlans:
    text_encoder: Plan
    transformer: Plan
    vae: Plan  # the decoder as fixed weights, no blocks; activations of the (tiled) decode
    vae_tile: int | None  # latent cells per tile; None = whole decode fits
    keep: bool  # every phase's weights fit on the device together: nothing is given back
    # image-to-image: the encoder as fixed weights, activations of an untiled encode; always given back
    # after its phase (it runs once per generation, and a later text-to-image run does not plan it)
    vae_encoder: Plan | None = None
    # the transformer runs each block on its batch in this many parts: 2 when a CFG batch of two passes
    # keeps fewer blocks resident (or does not fit) at once, 1 otherwise (plan_cfg_transformer)
    transformer_chunks: int = 1

    def of(self, name: str) -> Plan:
        return getattr(self, name)

    def to_dict(self) -> dict:
        out = {
            "text_encoder": self.text_encoder.to_dict(),
            "transformer": self.transformer.to_dict(),
            "vae": self.vae.to_dict(),
            "vae_tile": self.vae_tile,
            "keep": self.keep,
            "transformer_chunks": self.transformer_chunks,
        }
        if self.vae_encoder is not None:
            out["vae_encoder"] = self.vae_encoder.to_dict()
        return out


def _torch_dequant(device: torch.device) -> bool:
    from zimage_lite.kernels.dispatch import triton_usable

    return not triton_usable(device)


def _weights(plan: Plan) -> int:
    a = plan.accounted
    return a["fixed_weights"] + a["resident_blocks"] + a["ring"]


def _working(plan: Plan) -> int:
    """Working memory a phase reserves in the ledger while it runs (incl. a float32 retry's reserve)."""
    a = plan.accounted
    return a["activations"] + a["dequant_scratch"] + a["fp32_fallback"]


def plan_phases(
    text_encoder: nn.Module,
    transformer: nn.Module,
    vae: nn.Module,
    budget: VramBudget,
    device: torch.device,
    *,
    width: int,
    height: int,
    images: int,
    caption_tokens: int,
    dtype: torch.dtype,
    encode: bool = False,
    controlnet: nn.Module | None = None,
    cfg: bool = False,
) -> PhasePlans:
    """Plan every phase (`encode`: the VAE encoder too, for an init image; `cfg`: the transformer runs
    a negative pass beside every image, its activations doubled); raises UsageError (naming the
    minimum) when any phase cannot fit."""
    total = budget.total_bytes if budget.total_bytes is not None else UNLIMITED
    over = dict(context_bytes=budget.context_bytes, margin_bytes=budget.margin_bytes)
    slow = _torch_dequant(device)
    planners = {
        "text_encoder": lambda b: (
            plan_text_encoder(
                text_encoder, b, tokens=caption_tokens, batch=1, dtype=dtype, torch_dequant=slow, **over
            ),
            1,
        ),
        "transformer": lambda b: plan_cfg_transformer(
            transformer,
            b,
            width,
            height,
            images=images,
            cfg=cfg,
            dtype=dtype,
            caption_tokens=caption_tokens,
            torch_dequant=slow,
            controlnet=controlnet,
            **over,
        ),  # fmt: skip
    }
    # Plan the most demanding phase first, so a refusal names the minimum for the whole generation.
    minimum = {name: plan(UNLIMITED)[0].minimum_bytes for name, plan in planners.items()}
    planned = {name: planners[name](total) for name in sorted(planners, key=minimum.get, reverse=True)}
    plans = {name: plan for name, (plan, _) in planned.items()}
    decoder = fixed_bytes(vae.decoder, [])
    reserved = budget.context_bytes + budget.margin_bytes
    tile = choose_vae_tile(
        vae.config, total - budget.margin_bytes, width, height, images, vae.dtype, weight_bytes=decoder,
        context_bytes=budget.context_bytes,
    )  # fmt: skip
    f = vae.config.scale_factor
    decode = decode_bytes(vae.config, -(-height // f), -(-width // f), images, vae.dtype, tile)
    plans["vae"] = plan_blocks(
        [],
        total,
        fixed_bytes=decoder,
        activation_bytes=decode,
        what=f"VAE decode at {width}x{height}",
        **over,
    )
    everything = sum(_weights(p) for p in plans.values()) + max(_working(p) for p in plans.values())
    keep = all(not p.streamed for p in plans.values()) and reserved + everything <= total
    encoder = None
    if encode:  # planned alone: the other phases' weights are given back or counted as kept
        kept = sum(_weights(p) for p in plans.values()) if keep else 0
        encoder = plan_blocks(
            [],
            total - kept,
            fixed_bytes=fixed_bytes(vae.encoder, []),
            activation_bytes=encode_bytes(vae.config, -(-height // f), -(-width // f), vae.dtype),
            what=f"VAE encode at {width}x{height}",
            **over,
        )
    chunks = planned["transformer"][1]
    result = PhasePlans(
        plans["text_encoder"], plans["transformer"], plans["vae"], tile, keep, encoder, chunks
    )
    for name in ("text_encoder", "transformer", "vae"):
        log.info("%s", result.of(name).summary())
    log.info("VAE: %s; %s", "whole decode" if tile is None else f"tiles of {tile} latent cells",
             "all phases stay on the device" if keep else "each phase gives its memory back")  # fmt: skip
    return result


def plan_cfg_transformer(
    transformer: nn.Module, budget_bytes: int, width: int, height: int, *, images: int, cfg: bool, **kwargs
) -> tuple[Plan, int]:
    """(plan, chunks) for the transformer. With `cfg` every step runs 2 * images items: as one batch
    (chunks 1) where that plan keeps as many blocks resident as running the two passes one after the
    other inside each block (chunks 2) does, else the latter; either way each block is uploaded once."""
    if not cfg:
        return plan_transformer(transformer, budget_bytes, width, height, batch=images, **kwargs), 1
    options = []
    for chunks in (1, 2):
        try:
            plan = plan_transformer(
                transformer, budget_bytes, width, height, batch=2 * images, chunks=chunks, **kwargs
            )
        except UsageError:
            if chunks == 2:
                raise
            continue
        options.append((len(plan.resident), -chunks, plan))
    _, neg_chunks, plan = max(options, key=lambda o: o[:2])
    return plan, -neg_chunks


@dataclass
class DeviceRuntime:
    """Places each phase's weights on `device` per its plan (module docstring). One device layer and
    ledger for the whole pipeline, so memory a phase leaves behind shows in the next phase's `before`.
    `capacity` (CPU): the ledger refuses allocations beyond it, as a capped card would."""

    device: torch.device
    models: dict[str, PhaseModel]
    capacity: int | None = None
    layer: object = field(init=False)
    streamers: dict[str, BlockStreamer] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.layer = device_layer_for(self.device, ledger=DeviceLedger(self.capacity))

    def _streamer(self, name: str, plan: Plan) -> BlockStreamer:
        """The phase's streamer, re-planned when the placement changed (else left as it is)."""
        s = self.streamers.get(name)
        if s is not None and _placement(s.plan) == _placement(plan):
            return s
        if s is None:
            m = self.models[name]
            fixed = outside_tensors(m.root, m.blocks, m.host_only)
            s = self.streamers[name] = BlockStreamer(m.blocks, plan, self.layer, fixed=fixed)
        else:
            s.detach()
            s.replan(plan)
        return s

    @contextmanager
    def phase(self, name: str, plan: Plan, keep: bool, streaming: dict, memory: dict) -> Iterator[None]:
        """Run phase `name` inside this block; record its streamer counters into `streaming[name]` and
        its device bytes {"before", "peak", "after"} into `memory[name]`."""
        layer = self.layer
        before = layer.allocated_bytes()
        layer.reset_peak()
        streamer = self._streamer(name, plan)
        counters = _counters(streamer)
        working = _working(plan)
        layer.reserve(working, f"the {name.replace('_', ' ')}'s activations")
        try:
            streamer.attach()
            yield
            streaming[name] = _since(streamer.stats(), counters)
        finally:
            layer.release(working)
            peak = layer.peak_bytes()
            if not keep:
                streamer.detach()
            layer.empty_cache()
            after = layer.allocated_bytes()
            memory[name] = {"before": before, "peak": peak, "after": after}

    def prepare(self, plans: PhasePlans) -> None:
        """Before a generation: what earlier plans kept on the device goes back unless these keep too
        (a larger image may no longer leave room for every phase at once)."""
        if not plans.keep:
            self.release()

    def forget(self, name: str) -> None:
        """Give back phase `name`'s weights and drop its streamer: its tensors are about to change (a
        LoRA's buffers), so the next phase packs them anew."""
        streamer = self.streamers.pop(name, None)
        if streamer is not None:
            streamer.detach()

    def release(self) -> None:
        """Give back everything placed."""
        for s in self.streamers.values():
            s.detach()
        self.layer.empty_cache()

    def on_device(self, t: torch.Tensor) -> bool:
        """Does `t` live in device memory? (CPU: inside a buffer of the ledger.)"""
        return self.layer.holds(t)


def _placement(plan: Plan) -> tuple:
    return plan.block_bytes, plan.resident, plan.streamed, plan.ring_slots, plan.slot_bytes


def _counters(streamer: BlockStreamer) -> dict:
    s = streamer.stats()
    return {k: s[k] for k in COUNTERS}


def _since(stats: dict, start: dict) -> dict:
    """Streamer stats for one phase: cumulative counters minus their value at the phase's start."""
    out = {**stats, **{k: stats[k] - start[k] for k in COUNTERS}}
    hidden = max(out["copy_s"] - out["stall_s"], 0.0)
    out["hidden_copy_s"] = hidden
    out["overlap_fraction"] = hidden / out["copy_s"] if out["copy_s"] > 0 else None
    return out
