"""The three phases of a generation under a VRAM budget: plans made up front, blocks streamed per phase.

`plan_phases` plans the text encoder, the transformer and the VAE decode before any work starts, so an
impossible budget is refused with the minimum it needs instead of failing mid-run. `streamed` runs one
model's blocks through a BlockStreamer on the device (its other weights moved there for the phase and
back afterwards) and records the streamer's statistics under the phase's name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from zimage_lite.runtime.budget import VramBudget
from zimage_lite.runtime.device import device_layer_for
from zimage_lite.runtime.planner import Plan, plan_text_encoder, plan_transformer
from zimage_lite.runtime.streamer import BlockStreamer, move_outside_blocks
from zimage_lite.runtime.vae_tiling import choose_vae_tile

log = logging.getLogger(__name__)

UNLIMITED = 1 << 62  # a budget that always plans: used to read each phase's minimum


@dataclass(frozen=True)
class PhasePlans:
    text_encoder: Plan
    transformer: Plan
    vae_tile: int | None  # latent cells per tile; None = whole decode fits

    def to_dict(self) -> dict:
        return {
            "text_encoder": self.text_encoder.to_dict(),
            "transformer": self.transformer.to_dict(),
            "vae_tile": self.vae_tile,
        }


def _torch_dequant(device: torch.device) -> bool:
    from zimage_lite.kernels.dispatch import triton_usable

    return not triton_usable(device)


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
) -> PhasePlans:
    """Plan every phase; raises UsageError (naming the minimum) when any phase cannot fit."""
    total, ctx = budget.total_bytes, budget.context_bytes
    assert total is not None
    slow = _torch_dequant(device)
    planners = {
        "text_encoder": lambda b: plan_text_encoder(
            text_encoder,
            b,
            tokens=caption_tokens,
            batch=1,
            dtype=dtype,
            context_bytes=ctx,
            torch_dequant=slow,
        ),
        "transformer": lambda b: plan_transformer(
            transformer,
            b,
            width,
            height,
            batch=images,
            dtype=dtype,
            caption_tokens=caption_tokens,
            context_bytes=ctx,
            torch_dequant=slow,
        ),  # fmt: skip
    }
    # Plan the most demanding phase first, so a refusal names the minimum for the whole generation.
    minimum = {name: plan(UNLIMITED).minimum_bytes for name, plan in planners.items()}
    plans = {name: planners[name](total) for name in sorted(planners, key=minimum.get, reverse=True)}
    te, dit = plans["text_encoder"], plans["transformer"]
    decoder_bytes = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    tile = choose_vae_tile(
        vae.config, total, width, height, images, vae.dtype, weight_bytes=decoder_bytes, context_bytes=ctx
    )
    log.info("text encoder: %s", te.summary())
    log.info("transformer: %s", dit.summary())
    log.info("VAE: %s", "whole decode" if tile is None else f"tiles of {tile} latent cells")
    return PhasePlans(te, dit, tile)


@contextmanager
def streamed(
    model: nn.Module,
    blocks: list[nn.Module],
    plan: Plan,
    device: torch.device,
    stats: dict,
    name: str,
    move_outside: bool = True,
) -> Iterator[None]:
    """Blocks streamed per `plan`; with `move_outside`, the model's other weights sit on `device` for
    the duration (the text encoder keeps its embedding table on the host and gathers there)."""
    if move_outside:
        move_outside_blocks(model, blocks, device)
    streamer = BlockStreamer(blocks, plan, device_layer_for(device))
    try:
        with streamer:
            yield
            stats[name] = streamer.stats()
    finally:
        if move_outside:
            move_outside_blocks(model, blocks, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
