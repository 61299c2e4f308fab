"""The Pipeline as the worker uses it: loaded once (the same Pipeline.load as `generate`), with the
reuse parts in its slots, running one JobParams at a time. Only the worker thread calls `run`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.params import JobParams
from zimage_lite.serve.reuse import LoraLibrary, PlanCache, PromptFeatureCache

log = logging.getLogger(__name__)


@dataclass
class Engine:
    pipe: object  # zimage_lite.pipeline.Pipeline
    features: PromptFeatureCache
    plans: PlanCache
    loras: LoraLibrary
    model_id: str
    slots: int = 1  # jobs at once: one pipeline, one job

    @classmethod
    def load(cls, config: ServeConfig) -> Engine:
        from dataclasses import asdict

        from zimage_lite import preflight
        from zimage_lite.pipeline import Pipeline

        m = config.model
        preflight.before_load(m.model, m.transformer, m.text_encoder, m.vae, m.tokenizer, m.device, m.dtype)
        opts = asdict(m)
        pipe = Pipeline.load(opts.pop("model"), **opts)
        return cls.around(pipe, config)

    @classmethod
    def around(cls, pipe, config: ServeConfig) -> Engine:
        """An engine on a loaded pipeline: its text features and plans through caches."""
        from zimage_lite.weights.lora import read_lora

        features = PromptFeatureCache(pipe.text_features, config.prompt_cache_size, pipe.device)
        plans = PlanCache(pipe.plan_phases)
        pipe.text_features, pipe.plan_phases = features, plans
        loras = LoraLibrary(config.lora_dir, lambda path: read_lora(path, pipe.transformer))
        return cls(pipe, features, plans, loras, config.model_id or model_name(pipe.paths.transformer))

    def run(self, p: JobParams, on_step: Callable[[int, int, int], None]) -> list[Image.Image]:
        """Images for `p`; on_step(pass, i, n) after each step (pass 1, then 2 for the hires fix)."""
        if self.loras.select(p.loras, self.pipe.set_loras):
            self.plans.clear()  # the transformer's LoRA buffers count in its plan
        start = time.perf_counter()
        images = self.pipe.generate(
            p.prompt, seed=p.seed, steps=p.steps, width=p.width, height=p.height, batch=p.n,
            on_step=lambda i, n: on_step(1, i, n), image=p.image, mask=p.mask, strength=p.strength,
            **p.guidance_kwargs(), **p.control_kwargs(),
        )  # fmt: skip
        if p.hires is not None:  # hires_fix returns a list, as generate does: one image here
            images = [
                self.pipe.hires_fix(img, p.prompt, scale=p.hires.scale, strength=p.hires.strength,
                                    seed=p.seed, steps=p.steps, on_step=lambda i, n: on_step(2, i, n),
                                    **p.guidance_kwargs(), **p.control_kwargs())[0]
                for img in images
            ]  # fmt: skip
        log.debug("generated %d image(s) in %.3f s", len(images), time.perf_counter() - start)
        return images

    def stats(self):
        """The last job's Pipeline.Stats."""
        return self.pipe.last_stats

    def caches(self) -> dict:
        return {"prompt_features": self.features, "plans": self.plans, "loras": self.loras}

    def metadata(self, p: JobParams) -> dict[str, str]:
        return metadata(p, self.model_id, str(self.pipe.dtype).removeprefix("torch."))

    def last_replica(self) -> str | None:
        return None  # this process: the middleware names it

    def info(self) -> dict:
        """What a client (the web page) needs to know about the loaded model."""
        pipe = self.pipe
        d = pipe.variant.defaults
        return {
            "variant": pipe.variant.name,
            "model_defaults": {"steps": d.steps, "guidance": d.guidance},
            "loras": sorted(self.loras.names()),
            "controlnet": getattr(pipe, "controlnet", None) is not None,
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
        }


def metadata(p: JobParams, model_id: str, dtype: str) -> dict[str, str]:
    """PNG text, as `generate` writes it (the server's inputs have no file names)."""
    meta = {
        "prompt": p.prompt, "seed": str(p.seed), "steps": str(p.steps), "size": f"{p.width}x{p.height}",
        "dtype": dtype, "software": "zimage-lite serve", "model": model_id,
    }  # fmt: skip
    if p.image is not None:
        meta["init_image"] = "uploaded"
        meta["strength"] = "default" if p.strength is None else str(p.strength)
    if p.mask is not None:
        meta["mask"] = "uploaded"
    if p.loras:
        meta["loras"] = "; ".join(f"{c.name}:{c.scale:g}" for c in p.loras)
    if p.guidance is not None:
        meta["guidance"] = f"{p.guidance:g}"
    if p.negative_prompt:
        meta["negative_prompt"] = p.negative_prompt
    if p.control is not None:  # as generate's control_meta, the image having no file name
        c = p.control
        meta |= {
            "control": "uploaded",
            "control_scale": f"{c.scale:g}",
            "control_range": f"{c.start:g}-{c.end:g}",
        }
    if p.hires is not None:
        meta["hires"] = f"{p.hires.scale:g}x, strength {p.hires.strength:g}, same seed and steps"
    return meta


def model_name(path: Path) -> str:
    """A model id from the transformer's path: the model folder's name (`.../Z-Image-Turbo/transformer`),
    or a single file's stem."""
    path = Path(path)
    if path.name == "transformer" or path.parent.name == "transformer":
        return (path.parent if path.name == "transformer" else path.parent.parent).name or "zimage"
    return path.stem if path.suffix else path.name
