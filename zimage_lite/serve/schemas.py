"""Request bodies (pydantic) and their translation into JobParams under the server's limits.

Field names and values follow OpenAI's images API; `seed`, `steps`, `negative_prompt`, `guidance`,
`loras`, `hires`, `strength`, the ControlNet's `control_image` (base64) / `control_scale` /
`control_start` / `control_end` and (jobs API) base64 `image` / `mask` are ours. `quality` picks the steps
when `steps` is not given: low = half the default steps (--steps, else the model variant's), medium/
standard/auto = the default, high/hd = one and a half times it. `guidance` and `negative_prompt` go to
Pipeline.generate as they are (absent: the variant's defaults, Turbo 0 = no negative pass, base 4).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage_lite.cli_args import SEED_MAX, SIZE_MAX  # the CLI's ranges (SIZE_MAX: the RoPE tables' reach)
from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.errors import bad_request, not_found
from zimage_lite.serve.params import DEFAULT_CONTROL_SCALE, Control, Hires, JobParams, LoraChoice, OutputSpec

QUALITY_FACTOR = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5}
GUIDANCE_MAX = 30.0
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)


class HiresRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(gt=1.0, le=4.0)
    strength: float = Field(default=0.35, gt=0.0, le=1.0)


class ImageRequest(BaseModel):
    """The fields /v1/images/generations, /v1/images/edits and /v1/jobs share."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] = "auto"
    background: Literal["auto", "opaque"] = "auto"
    moderation: Literal["auto", "low"] = "auto"  # accepted for OpenAI clients; nothing is moderated here
    style: Literal["vivid", "natural"] | None = None  # DALL-E 3's; accepted and ignored
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    steps: int | None = Field(default=None, ge=1)
    negative_prompt: str | None = None
    guidance: float | None = None
    loras: list[LoraRef] = Field(default_factory=list)
    hires: HiresRef | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    control_image: str | None = None  # base64 (a data: URL is fine); needs a server with --controlnet
    control_scale: float | None = Field(default=None, ge=0.0, le=4.0)  # generate --control-scale's range
    control_start: float | None = Field(default=None, ge=0.0, le=1.0)
    control_end: float | None = Field(default=None, ge=0.0, le=1.0)


CONTROL_FIELDS = ("control_image", "control_scale", "control_start", "control_end")


class JobRequest(ImageRequest):
    """POST /v1/jobs: the same fields, plus an init image and mask as base64 (a data: URL is fine)."""

    image: str | None = None
    mask: str | None = None


def parse_size(text: str, config: ServeConfig) -> tuple[int, int]:
    if text == "auto":
        return config.default_size
    m = _SIZE.match(text)
    if m is None:
        raise bad_request(f"size must be WIDTHxHEIGHT or auto (got {text[:40]!r})", "size")
    width, height = int(m[1]), int(m[2])
    for side in (width, height):
        if side < 16 or side % 16 or side > SIZE_MAX:
            raise bad_request(
                f"size {text}: each side must be a multiple of 16 from 16 to {SIZE_MAX}", "size"
            )
    if width * height > config.limits.max_pixels:
        raise bad_request(f"size {text} is over this server's {config.limits.max_pixels} pixels", "size")
    return width, height


@dataclass(frozen=True)
class Offer:
    """What this server has, against which a request is checked."""

    model_id: str
    lora_names: frozenset[str]
    default_steps: int  # --steps, else the model variant's
    controlnet: bool = False  # started with --controlnet


def quality_steps(default_steps: int) -> dict[str, int]:
    return {q: max(1, round(default_steps * f)) for q, f in QUALITY_FACTOR.items()}


def _steps(req: ImageRequest, config: ServeConfig, default_steps: int) -> int:
    steps = req.steps or quality_steps(default_steps)[req.quality]
    if steps > config.limits.max_steps:
        raise bad_request(f"steps must be at most {config.limits.max_steps} here (got {steps})", "steps")
    return steps


def check_model(model: str | None, model_id: str) -> None:
    if model is not None and model != model_id:
        raise not_found(f"the model {model[:100]!r} does not exist here; this server has {model_id!r}",
                        "model", "model_not_found")  # fmt: skip


def _check_guidance(req: ImageRequest, config: ServeConfig) -> None:
    """Classifier-free guidance (Pipeline.generate's): a scale in [0, GUIDANCE_MAX], a bounded negative."""
    if req.negative_prompt is not None and len(req.negative_prompt) > config.limits.max_prompt_chars:
        raise bad_request(f"negative_prompt is over {config.limits.max_prompt_chars} characters",
                          "negative_prompt")  # fmt: skip
    if req.guidance is not None and not 0.0 <= req.guidance <= GUIDANCE_MAX:
        raise bad_request(f"guidance must be from 0 to {GUIDANCE_MAX:g} (got {req.guidance})", "guidance")


def _control(req: ImageRequest, offer: Offer, images: dict) -> Control | None:
    """The ControlNet inputs, or a 400 naming the first control field this server cannot honour."""
    given = [name for name in CONTROL_FIELDS if getattr(req, name) is not None]
    if not given:
        return None
    if not offer.controlnet:
        raise bad_request(f"{given[0]}: this server has no ControlNet (start it with --controlnet PATH)",
                          given[0], "no_controlnet")  # fmt: skip
    if images.get("control_image") is None:
        raise bad_request(f"{given[0]} needs a control_image", "control_image")
    start = 0.0 if req.control_start is None else req.control_start
    end = 1.0 if req.control_end is None else req.control_end
    if start >= end:
        raise bad_request(f"control_start {start:g} must be below control_end {end:g}", "control_start")
    scale = DEFAULT_CONTROL_SCALE if req.control_scale is None else req.control_scale
    return Control(images["control_image"], scale, start, end)


def _loras(refs: list[LoraRef], names: set[str], config: ServeConfig) -> tuple[LoraChoice, ...]:
    if len(refs) > config.limits.max_loras:
        raise bad_request(f"at most {config.limits.max_loras} LoRAs per request", "loras")
    for ref in refs:
        if ref.name not in names:
            raise bad_request(f"no LoRA named {ref.name[:100]!r} in this server's LoRA folder", "loras",
                              "unknown_lora")  # fmt: skip
    return tuple(LoraChoice(r.name, r.scale) for r in refs)


def to_params(
    req: ImageRequest, config: ServeConfig, offer: Offer, images: dict | None = None
) -> tuple[JobParams, OutputSpec]:
    """The job a request asks for, or ApiError naming the first field out of bounds. `images`: the
    decoded init image and mask (edits, jobs)."""
    check_model(req.model, offer.model_id)
    limits = config.limits
    if len(req.prompt) > limits.max_prompt_chars:
        raise bad_request(
            f"prompt is {len(req.prompt)} characters; at most {limits.max_prompt_chars}", "prompt"
        )
    if not req.prompt.strip():
        raise bad_request("prompt is empty", "prompt")
    if req.n > limits.max_n:
        raise bad_request(f"n must be from 1 to {limits.max_n} here (got {req.n})", "n")
    _check_guidance(req, config)
    images = images or {}
    size = req.size
    if size == "auto" and images.get("image") is not None:  # an edit keeps its image's size (to 16s)
        size = "x".join(str(max(16, side // 16 * 16)) for side in images["image"].size)
    width, height = parse_size(size, config)
    if images.get("image") is None and (images.get("mask") is not None or req.strength is not None):
        raise bad_request("a mask or a strength needs an image", "image")
    params = JobParams(
        prompt=req.prompt, width=width, height=height,
        seed=secrets.randbelow(2**32) if req.seed is None else req.seed, steps=_steps(req, config, offer.default_steps),
        n=req.n,
        loras=_loras(req.loras, offer.lora_names, config),
        hires=None if req.hires is None else Hires(req.hires.scale, req.hires.strength),
        strength=req.strength, image=images.get("image"), mask=images.get("mask"), guidance=req.guidance,
        negative_prompt=req.negative_prompt, control=_control(req, offer, images),
    )  # fmt: skip
    if params.hires is not None:
        from zimage_lite.init_image import upscaled_size

        w, h = upscaled_size(width, height, params.hires.scale)
        if w * h > limits.max_pixels or max(w, h) > SIZE_MAX:
            raise bad_request(f"the hires pass ({w}x{h}) is over this server's size limit", "hires")
    return params, OutputSpec(req.output_format, req.output_compression, req.response_format)
