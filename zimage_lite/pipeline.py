"""Prompt -> text encoder -> denoise -> VAE -> images: the public `Pipeline`.

Phases run one after another on the device (text encoder, transformer, VAE); each phase's timing and the
per-step timings land in `pipe.last_stats` as plain JSON-able values.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from zimage_lite.cli_args import SEED_MAX  # one seed range for the CLI, the server and the API
from zimage_lite.control import control_part, controlled
from zimage_lite.errors import UsageError, ZImageError
from zimage_lite.guidance import Guidance, guided, negative_prompts
from zimage_lite.init_image import image_tensor, init_latents, mask_tensor
from zimage_lite.runtime.fp32_fallback import RetryInFloat32
from zimage_lite.runtime.planner import transformer_root
from zimage_lite.sampling import (
    euler_sample,
    initial_noise,
    keep_unmasked,
    noised,
    strength_start,
    turbo_sigmas,
)
from zimage_lite.weights.components import ModelPaths, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was asked for, but this torch has no usable CUDA device: run on the CPU")
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"unsupported device {device!r}: use cuda or cpu")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; on CUDA per the card's generation (runtime/cards.py: bf16 from sm 8.0, fp16 on
    sm 7.x, fp32 on Pascal, refused below)."""
    from zimage_lite.runtime.cards import capability_of, compute_dtype

    return compute_dtype(capability_of(device))


def _budget(vram, card, device: torch.device):
    """The VramBudget for `vram` / `card` on `device` (see Pipeline.load): a `vram` under a `card`
    plans in less than the emulated card gives."""
    from dataclasses import replace

    from zimage_lite.runtime.budget import emulate_card, parse_vram, resolve_budget

    if card is None:
        return resolve_budget("auto" if vram is None else vram, device)
    budget = emulate_card(card, device)
    n = parse_vram(vram)
    if n is None:
        return budget
    if n > budget.total_bytes:
        raise UsageError(f"--vram {vram} is larger than the emulated --card {card}")
    return replace(budget, total_bytes=n)


def effective_strength(strength: float | None, mask) -> float:
    """The image-to-image strength a run uses: the given one, else 0.6 (1.0 when inpainting)."""
    return (0.6 if mask is None else 1.0) if strength is None else strength


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if v < 16 or v % 16:
            raise UsageError(f"{name} must be a positive multiple of 16 (got {v})")


@dataclass
class Stats:
    """Timings in seconds; bytes as integers. `streaming` holds each phase's streamer stats
    (host-to-device bytes, pinned host bytes, copy time hidden behind compute, ...) and the plans;
    `device_memory` each phase's device bytes before it, at its peak and after it (CUDA: the
    allocator's; CPU: the device ledger's, with the planned activations reserved)."""

    phases: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    peak_device_bytes: int | None = None
    streaming: dict = field(default_factory=dict)
    device_memory: dict = field(default_factory=dict)
    # steps redone with float32 compute because they gave non-finite values (runtime/fp32_fallback.py)
    fp32_fallback_steps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"phases_s": self.phases, "steps_s": self.steps, "peak_device_bytes": self.peak_device_bytes}
        out["fp32_fallback_steps"] = self.fp32_fallback_steps
        if self.streaming:
            out["streaming"] = self.streaming
        if self.device_memory:
            out["device_memory"] = self.device_memory
        return out


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Pipeline:
    """Z-Image (Turbo or base) text-to-image. Build with `Pipeline.load(...)`, call `generate(...)`.

    Weights are loaded into host memory; each phase places what its plan says on the device
    (`runtime.phases`), whatever the budget: with no `vram` the plan is made against the card's free
    memory (CUDA) or no limit (CPU), and everything that fits stays on the device across images."""

    def __init__(
        self,
        paths: ModelPaths,
        tokenizer,
        text_encoder,
        transformer,
        vae,
        device: torch.device,
        dtype,
        budget=None,
        variant=None,
        controlnet=None,
    ):
        from zimage_lite.runtime.budget import VramBudget
        from zimage_lite.runtime.phases import DeviceRuntime, phase_models, plan_phases
        from zimage_lite.variants import read_variant

        self.paths = paths
        self.variant = variant or read_variant(paths.root)  # variants.ModelVariant: defaults, scheduler
        self.budget = budget or VramBudget(None, 0, "unlimited")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.last_stats = Stats()
        self.load_seconds = 0.0
        capacity = self.budget.total_bytes if self.budget.source == "card" and device.type == "cpu" else None
        self.controlnet = controlnet
        self.runtime = DeviceRuntime(
            device, phase_models(text_encoder, transformer, vae, controlnet), capacity
        )
        self._plans = None
        self.loras: list[tuple[str, dict, float]] = []  # (file, {layer: LowRank}, scale), in load order
        # Parts a server swaps for caching ones (serve/reuse.py); same signatures, same results.
        self.text_features: Callable[[list[list[int]]], list[torch.Tensor]] = self.encode_in_phase
        self.plan_phases: Callable[..., object] = plan_phases

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        transformer: str | Path | None = None,
        text_encoder: str | Path | None = None,
        vae: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        vram: str | int | None = None,
        card: str | int | None = None,
        fp8_matmul: str = "dequant",
        variant: str | None = None,
        controlnet: str | Path | None = None,
    ) -> Pipeline:
        """`vram` ("6GB", "auto", bytes): the device budget every phase is planned in; None plans
        against the free memory of a GPU (no limit on the CPU). `card` ("6GB"): run as on a card of
        that size (the allocator capped as it would be, and that budget; see budget.emulate_card).
        `fp8_matmul` "native": FP8 weights on the FP8 tensor cores where the card has them (sm >= 8.9;
        kernels/fp8_matmul.py), else dequantized (the default, and the fallback elsewhere). `variant`
        ("turbo", "base"): whose sampling defaults apply (default: from the model's files, variants.py).
        `controlnet`: a Fun-Controlnet-Union file or folder (any layout weights/names_controlnet.py reads)."""
        from zimage_lite.runtime.cards import capability_of, compute_dtype
        from zimage_lite.runtime.quant_linear import set_fp8_matmul
        from zimage_lite.variants import read_variant
        from zimage_lite.weights.loaders import load_text_encoder, load_tokenizer, load_transformer, load_vae
        from zimage_lite.weights.names_controlnet import load_controlnet

        start = time.perf_counter()
        dev = resolve_device(device)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise UsageError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = compute_dtype(capability_of(dev), dtype)  # refuses cards below sm 6.0 (runtime/cards.py)
        budget = _budget(vram, card, dev)
        paths = resolve_model(model, transformer, text_encoder, vae, tokenizer)
        model_variant = read_variant(paths.root, variant)
        host = torch.device("cpu")  # phases place weights on the device per their plan
        dit = load_transformer(paths.transformer, dtype, host).eval()
        control = None if controlnet is None else load_controlnet(controlnet, dtype, host)
        if control is not None:
            control.config.check_fits(dit.config)
        pipe = cls(
            paths,
            tokenizer=load_tokenizer(paths.tokenizer),
            text_encoder=load_text_encoder(paths.text_encoder, dtype, host).eval(),
            transformer=dit,
            vae=load_vae(paths.vae, dtype, host).eval(),
            device=dev,
            dtype=dtype,
            budget=budget,
            variant=model_variant,
            controlnet=control,
        )
        for m in (pipe.text_encoder, pipe.transformer, *([control] if control is not None else [])):
            set_fp8_matmul(m, fp8_matmul)
        pipe.load_seconds = time.perf_counter() - start
        return pipe

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Add a LoRA file's low-rank updates, times `scale`, beside the transformer's linears (any weight
        format; nothing is dequantized or merged). A file that does not fit raises and changes nothing."""
        from zimage_lite.weights.lora import read_lora

        if not math.isfinite(scale):
            raise UsageError(f"LoRA {path}: the scale must be a finite number (got {scale})")
        updates = read_lora(path, self.transformer)
        added = self.set_loras([*self.loras, (str(path), updates, float(scale))])
        log.info("LoRA %s (scale %g): %d layers, %.1f MiB in all", path, scale, len(updates), added / 2**20)

    def set_loras(self, loras: list[tuple[str, dict, float]]) -> int:
        """Replace the LoRAs beside the transformer by `loras` ((name, updates from read_lora, scale)),
        reading no file: a server switches them per request. Returns the bytes added."""
        from zimage_lite.runtime.lora import apply_loras

        self.runtime.forget("transformer")
        added = apply_loras(self.transformer, [(u, s) for _, u, s in loras], self.dtype)
        self.loras = list(loras)
        return added

    def unload_loras(self) -> None:
        from zimage_lite.runtime.lora import remove_loras

        self.runtime.forget("transformer")
        remove_loras(self.transformer)
        self.loras = []

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """One (L_i, hidden) tensor per prompt: real tokens only (causal attention needs no padding)."""
        return self.encode_ids(self.tokenizer.encode(prompts))

    @torch.no_grad()
    def encode_ids(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Text-encoder features of token ids. The embedding table stays in host memory: rows are
        gathered there, then moved (the text encoder's weights must be placed: see `_phase`)."""
        out = []
        for row in ids:
            emb = self.text_encoder.embed_tokens(torch.tensor([row], dtype=torch.long))
            out.append(self.text_encoder.forward_embeddings(emb.to(self.device))[0])
        return out

    def encode_in_phase(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """`encode_ids` with the text encoder's weights placed per its plan for the call."""
        with self._phase("text_encoder"):
            return self.encode_ids(ids)

    @torch.no_grad()
    def generate_latents(
        self,
        prompt: str | list[str],
        *,
        seed: int = 0,
        steps: int | None = None,
        width: int = 1024,
        height: int = 1024,
        batch: int = 1,
        on_step: Callable[[int, int], None] | None = None,
        image: Image.Image | None = None,
        strength: float | None = None,
        mask: Image.Image | None = None,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        cfg_normalization: float | bool | None = None,
        cfg_truncation: float | None = None,
        control_image: Image.Image | None = None,
        control_scale: float = 0.75,
        control_start: float = 0.0,
        control_end: float = 1.0,
        control_inpaint: Image.Image | None = None,
        control_mask: Image.Image | None = None,
        batch_index: int | None = None,
    ) -> torch.Tensor:
        """Final float32 latents (B*batch, C, H/8, W/8) before VAE decoding.

        `steps`, `guidance`, `cfg_normalization`, `cfg_truncation`: None takes the model variant's
        default (variants.py; Turbo: 8 steps, no guidance). With guidance > 0, classifier-free guidance
        as diffusers' ZImagePipeline (guidance.py) against `negative_prompt` (default "", one per prompt).
        `batch_index` i remakes image i of a `batch` run alone: the batch's noise is drawn from the one
        seeded generator (as diffusers does), row i kept, so it is that image, not the one of seed + i.
        With `image` (resized to width x height): image-to-image from the schedule cut by `strength`
        (default 0.6); with `mask` too, inpainting (white = re-generate; strength default 1.0).
        `on_step(i, n)` counts the steps that run (fewer than `steps` when strength < 1).
        `control_image` (with a ControlNet loaded): its hints times `control_scale` join the steps whose
        sigma lies in the schedule's [control_start, control_end] fraction, both passes of guidance;
        `control_inpaint` + `control_mask`: ControlNet inpainting through the 33-channel input (control.py).

        Structure: settings -> tokens -> plans -> text encoder phase -> start latents -> the Euler loop
        over a denoiser (the transformer, wrapped by `guided`) with `_step_callback` after each step."""
        steps, cfg = self.sampling_settings(steps, guidance, cfg_normalization, cfg_truncation)
        check_size(width, height)
        if steps < 1 or batch < 1:
            raise UsageError("steps and batch must be >= 1")
        if not 0 <= seed <= SEED_MAX:
            raise UsageError(f"seed must be from 0 to {SEED_MAX} (got {seed})")
        if batch_index is not None and not 0 <= batch_index < batch:
            raise UsageError(f"batch_index {batch_index} is not in a batch of {batch}")
        if image is None and (mask is not None or strength is not None):
            raise UsageError("a mask or a strength needs an init image")
        if image is not None:
            strength = effective_strength(strength, mask)
        start = 0 if image is None else strength_start(steps, strength)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompts(prompts, negative_prompt, cfg)
        stats = self.last_stats = Stats()
        timer = _Timer(self.device)

        ids = self._tokens(prompts + negatives)
        encode = image is not None or control_image is not None
        n = len(prompts) * batch
        # rows of the noise drawn (prompt p, copy i at p*batch + i) and the rows run
        rows = [p * batch + i for p in range(len(prompts)) for i in range(batch) if batch_index in (None, i)]
        self._plan(ids, width, height, len(rows), encode=encode, cfg=cfg.active)
        t0 = timer.now()
        features = [c for c in self.text_features(ids) for _ in range(batch)]
        stats.phases["text_encoder"] = timer.now() - t0
        captions = [features[r] for r in rows]
        negative = [features[n + r] for r in rows] if len(features) > n else []

        latents, blend = self._start(image, mask, start, steps, seed, n, width, height, rows)
        control = control_part(
            self.controlnet, self.encode_pixels, self.vae.config, control_image, width, height,
            scale=control_scale, start=control_start, end=control_end, inpaint=control_inpaint,
            mask=control_mask, device=self.device, scheduler=self.variant.scheduler,
        )  # fmt: skip
        t1 = timer.now()  # "denoise" starts after the VAE encode of an init image (timed on its own)
        transformer = controlled(self.transformer, control)
        denoise = guided(transformer, captions, negative, cfg, self._plans.transformer_chunks)
        # a float16 step that still overflows is redone in float32, both CFG passes and the control branch
        root = transformer_root(self.transformer, self.controlnet)
        denoise = RetryInFloat32(denoise, root, self.dtype, first_step=start)
        stats.fp32_fallback_steps = denoise.steps
        step_done = self._step_callback(timer, t1, start, steps, on_step)
        with self._phase("transformer"):
            latents = euler_sample(
                denoise, latents, steps, self.variant.scheduler, on_step=step_done, start=start, blend=blend
            )
        stats.phases["denoise"] = timer.now() - t1
        return latents

    def sampling_settings(
        self,
        steps: int | None = None,
        guidance: float | None = None,
        cfg_normalization: float | bool | None = None,
        cfg_truncation: float | None = None,
    ) -> tuple[int, Guidance]:
        """(steps, Guidance) a generation runs with: each given value, else the model variant's default."""
        d = self.variant.defaults
        pick = lambda value, default: default if value is None else value  # noqa: E731
        cfg = Guidance(
            float(pick(guidance, d.guidance)),
            float(pick(cfg_normalization, d.cfg_normalization)),
            float(pick(cfg_truncation, d.cfg_truncation)),
        )
        return int(pick(steps, d.steps)), cfg

    def _tokens(self, prompts: list[str]) -> list[list[int]]:
        """Token ids per prompt; a prompt that gives none is refused (the chat template alone always
        gives some, so only a tokenizer without those tokens can: nothing to condition on)."""
        ids = self.tokenizer.encode(prompts)
        for i, row in enumerate(ids):
            if not row:
                raise UsageError(
                    f"prompt {prompts[i]!r} gives no tokens with this tokenizer (not even the chat "
                    "template's): nothing to condition on"
                )
        return ids

    def _step_callback(self, timer, t_start: float, start: int, steps: int, on_step):
        """The Euler loop's `on_step(i, x)`: refuses non-finite latents, times the step, reports it."""
        stats = self.last_stats
        last = [t_start]

        def step_done(i: int, x: torch.Tensor) -> None:
            if not torch.isfinite(x).all():
                hint = (
                    " (float16 overflow: try --dtype float32 or bfloat16)"
                    if self.dtype == torch.float16
                    else ""
                )
                raise ZImageError(f"NaN/Inf in the latents after step {i + 1}{hint}")
            now = timer.now()
            stats.steps.append(now - last[0])
            last[0] = now
            if on_step is not None:
                on_step(i - start, steps - start)

        return step_done

    def _start(self, image, mask, start, steps, seed, images, width, height, rows):
        """(start latents on the device, inpainting blend or None) for the schedule entered at `start`:
        the noise of `images` drawn as one tensor, the `rows` of it that run kept."""
        cfg = self.vae.config
        if image is None:
            noise = initial_noise(
                images, self.transformer.config.in_channels, height, width, seed, cfg.scale_factor
            )
            return noise[rows].to(self.device), None
        moments = self.encode_image(image, width, height)
        init = init_latents(moments, images, seed, cfg.scaling_factor, cfg.shift_factor)
        clean, noise = init.image[rows].to(self.device), init.noise[rows].to(self.device)
        latents = noised(clean, noise, turbo_sigmas(steps, self.variant.scheduler)[start].to(self.device))
        if mask is None:
            return latents, None
        latent_mask = mask_tensor(mask, width, height, cfg.scale_factor).to(self.device)
        return latents, keep_unmasked(clean, noise, latent_mask)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """VAE encoder moments (1, 2C, H/8, W/8), float32 on the CPU, of `image` resized to width x height
        (Lanczos), in the "vae_encoder" phase (planned by generate_latents, or now for this size)."""
        if self._plans is None or self._plans.vae_encoder is None:
            self._plan([[0]], width, height, 1, encode=True)
        return self.encode_pixels(image_tensor(image, width, height))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE encoder moments of pixels (1, 3, H, W) in [-1, 1], as `encode_image` (planned first)."""
        timer = _Timer(self.device)
        t0 = timer.now()
        s = self.last_stats
        with self.runtime.phase("vae_encoder", self._plans.vae_encoder, False, s.streaming, s.device_memory):
            moments = self.vae.encoder(pixels.to(self.device, self.vae.dtype))
        s.phases["vae_encode"] = s.phases.get("vae_encode", 0.0) + timer.now() - t0
        return moments.float().cpu()

    def _plan(
        self,
        ids: list[list[int]],
        width: int,
        height: int,
        images: int,
        encode: bool = False,
        cfg: bool = False,
    ) -> None:
        """All phases planned before any work, so a budget too small fails first (`encode`: with the
        VAE encoder, for an init image; `cfg`: the transformer runs a negative pass beside each image)."""
        try:
            self._plans = self.plan_phases(
                self.text_encoder, self.transformer, self.vae, self.budget, self.device, width=width,
                height=height, images=images, caption_tokens=max(len(r) for r in ids), dtype=self.dtype,
                encode=encode, cfg=cfg, controlnet=self.controlnet,
            )  # fmt: skip
        except UsageError as exc:
            if self.budget.source != "auto":
                raise
            raise UsageError(
                f"{exc}; that budget is what the GPU had free when the model loaded (no --vram given): "
                "close other GPU programs, or use a smaller size or quantization"
            ) from None
        self.runtime.prepare(self._plans)
        self.last_stats.streaming["plans"] = self._plans.to_dict()

    def _phase(self, name: str):
        """Places phase `name`'s weights per its plan for the duration (runtime.phases)."""
        s = self.last_stats
        plans = self._plans
        return self.runtime.phase(name, plans.of(name), plans.keep, s.streaming, s.device_memory)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        from zimage_lite.runtime.vae_tiling import decode_to_uint8_tiled

        if self._plans is None:
            raise UsageError("decode() needs the plans of a generate_latents() call first")
        timer = _Timer(self.device)
        t0 = timer.now()
        with self._phase("vae"):
            pixels = decode_to_uint8_tiled(self.vae, latents.to(self.device), self._plans.vae_tile)
        pixels = pixels.cpu().numpy()  # (B, H, W, 3) uint8
        self.last_stats.phases["vae"] = timer.now() - t0
        self.last_stats.peak_device_bytes = max(m["peak"] for m in self.last_stats.device_memory.values())
        return [Image.fromarray(p) for p in pixels]

    def hires_fix(
        self, image: Image.Image, prompt: str, *, scale: float = 1.5, strength: float = 0.35, **kwargs
    ) -> list[Image.Image]:
        """The hires fix: `image` upscaled by `scale` in pixel space (Lanczos; sides rounded to multiples of
        16), then image-to-image at that size with `strength`: more detail, same composition. kwargs
        (seed, steps, on_step) as `generate_latents`. A list of one image, as `generate` returns."""
        from zimage_lite.init_image import upscaled_size

        if scale <= 1.0:
            raise UsageError(f"the hires scale must be above 1 (got {scale})")
        width, height = upscaled_size(*image.size, scale)
        return self.generate(prompt, width=width, height=height, image=image, strength=strength, **kwargs)

    def generate(self, prompt: str | list[str], **kwargs) -> list[Image.Image]:
        """Images for `prompt` (a string or a list; `batch` images each). kwargs as `generate_latents`."""
        return self.decode(self.generate_latents(prompt, **kwargs))
