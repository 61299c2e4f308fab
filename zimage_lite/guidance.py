"""Classifier-free guidance as diffusers' ZImagePipeline does it, as a denoiser the Euler loop composes.

Per step, with t_norm = the transformer's time input ((1000 - 1000*sigma) / 1000, 0 = noise, 1 = clean):
- the scale is `scale`, or 0 once `truncation` <= 1 and t_norm > truncation (`cfg_truncation`);
- at scale 0 only the positive pass runs (no negative pass at all: Turbo's case);
- else both: pred = pos + scale * (pos - neg) in float32, and with `normalization` c > 0 the prediction
  is scaled down where its norm (over the whole item) exceeds c * |pos| (`cfg_normalization`);
- the two passes are one call of the transformer on a batch of 2B (positives first, negatives after,
  each with its own caption: items of different caption lengths are masked in the DiT), so each
  streamed block is uploaded once per step; `passes=2` runs the halves one after the other inside
  each block call (the DiT's `chunks`), still one upload, for budgets too small for the doubled
  activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zimage_lite.errors import UsageError

log = logging.getLogger(__name__)

Transformer = Callable[..., torch.Tensor]  # (latents (B,C,H,W), t (B,), captions [(L_i, D)], chunks=) -> out


@dataclass(frozen=True)
class Guidance:
    """CFG settings: diffusers' guidance_scale, cfg_normalization (a factor, 0 = off; True = 1.0) and
    cfg_truncation (1.0 = guidance at every step). diffusers guides when guidance_scale > 0."""

    scale: float = 0.0
    normalization: float = 0.0
    truncation: float = 1.0

    def __post_init__(self) -> None:
        for name in ("scale", "normalization", "truncation"):
            v = float(getattr(self, name))
            if not v >= 0.0 or v == float("inf"):  # rejects NaN too
                raise UsageError(f"guidance {name} must be a finite number >= 0 (got {v})")

    @property
    def active(self) -> bool:
        """Does any step need the negative prompt? (diffusers: do_classifier_free_guidance)."""
        return self.scale > 0

    def scale_at(self, t_norm: float) -> float:
        """The guidance scale of a step whose transformer time input is `t_norm`."""
        if self.truncation <= 1 and t_norm > self.truncation:
            return 0.0
        return self.scale


def combine(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
    """pos + scale * (pos - neg) in float32, per item renormalised to at most `normalization` * |pos|.
    pos, neg: (B, C, H, W)."""
    pos, neg = pos.float(), neg.float()
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        dims = tuple(range(1, pred.dim()))
        pos_norm = torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
        new_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        limit = pos_norm * float(normalization)
        pred = torch.where(new_norm > limit, pred * (limit / new_norm), pred)
    return pred


def guided(
    transformer: Transformer,
    positive: list[torch.Tensor],
    negative: list[torch.Tensor],
    guidance: Guidance,
    passes: int = 1,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The Euler loop's denoiser `(x (B,C,H,W) float32, t (B,)) -> model output`: the transformer on
    `positive` captions, guided by `negative` ones (one per positive) as `guidance` says."""
    if guidance.active and len(negative) != len(positive):
        raise ValueError(f"{len(negative)} negative captions for {len(positive)} positive ones")

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = guidance.scale_at(float(t[0]))
        if scale <= 0:
            return transformer(x, t, positive)
        # one batch of 2B: (B, C, H, W) -> (2B, C, H, W), positives first, as diffusers orders them
        out = transformer(torch.cat([x, x]), torch.cat([t, t]), positive + negative, chunks=passes)
        pos, neg = out.chunk(2)
        return combine(pos, neg, scale, guidance.normalization)

    return denoise


def negative_prompts(
    prompts: list[str], negative_prompt: str | list[str] | None, guidance: Guidance
) -> list[str]:
    """One negative prompt per prompt, [] without guidance (diffusers encodes none then). The default is
    the empty prompt, as in diffusers (it still has the chat template's tokens); a single string applies
    to every prompt."""
    if not guidance.active:
        if negative_prompt:
            log.warning("the negative prompt is ignored: guidance is 0")
        return []
    if negative_prompt is None:
        return [""] * len(prompts)
    if isinstance(negative_prompt, str):
        return [negative_prompt] * len(prompts)
    negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise UsageError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
    return negatives
