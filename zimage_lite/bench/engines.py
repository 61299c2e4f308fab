"""What the harness times: one loaded pipeline that turns (prompt, seed) into latents, an image and a Sample.

`OursEngine` wraps zimage-lite's `Pipeline`; the diffusers baselines (baselines.py) offer the same small
interface, so the measuring loop in runner.py is one piece of code for every row.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@dataclass
class Sample:
    """One measured generation. Seconds; bytes as integers, None where the engine cannot tell."""

    seconds: float
    steps_s: list[float]
    phases_s: dict[str, float] = field(default_factory=dict)
    peak_device_bytes: int | None = None
    h2d_bytes: int | None = None


@dataclass
class Generation:
    latents: np.ndarray  # float32 (1, C, H/8, W/8)
    image: Image.Image
    sample: Sample


def weight_bytes(path: Path | None) -> int | None:
    """Bytes of weight files at `path` (a file, or the weight files in a folder tree)."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def component_bytes(paths) -> dict[str, int | None]:
    """{"transformer_bytes", "text_encoder_bytes", "vae_bytes", "total_bytes"} for a ModelPaths."""
    sizes = {
        f"{k}_bytes": weight_bytes(getattr(paths, k, None)) for k in ("transformer", "text_encoder", "vae")
    }
    known = [v for v in sizes.values() if v is not None]
    sizes["total_bytes"] = sum(known) if known else None
    return sizes


def tensor_types(path: Path | None) -> dict[str, int] | None:
    """{storage type: tensor count} of a weight file or folder ("Q8_0", "F32", "float8_e4m3fn", ...)."""
    if path is None or not path.exists():
        return None
    try:
        if path.is_file() and path.suffix == ".gguf":
            from zimage_lite.weights.gguf import GGUFCheckpoint

            src = GGUFCheckpoint(path)
            types = [src.qtype(k) for k in src.keys()]
        else:
            from zimage_lite.weights.safetensors import SafetensorsCheckpoint

            src = SafetensorsCheckpoint.open(path)  # every stored tensor, FP8 scales too, as torch names
            types = [str(src.stored_dtype(k)).removeprefix("torch.") for k in src.all_keys()]
    except Exception:  # a report detail: an unreadable header must not cost the row
        return None
    return dict(Counter(types).most_common())


def file_quantizer(path: Path | None) -> str | None:
    """What wrote a converted file's quantized tensors (its `zimage_lite.quantizer` metadata), or None."""
    if path is None or not path.is_file():
        return None
    from zimage_lite.quant.formats import QUANTIZER_KEY

    try:
        if path.suffix == ".gguf":
            from zimage_lite.weights.gguf import GGUFCheckpoint

            return GGUFCheckpoint(path).field(QUANTIZER_KEY)
        from zimage_lite.weights.safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint.open(path).field(QUANTIZER_KEY)
    except Exception:  # a report detail: an unreadable header must not cost the row
        return None


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _find_all(stats, name: str) -> list[float]:
    """Every number stored under `name` in a nested stats dict (one per streamed component)."""
    if not isinstance(stats, dict):
        return []
    found = [
        v for k, v in stats.items() if k == name and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return found + [x for v in stats.values() if isinstance(v, dict) for x in _find_all(v, name)]


def _stat(stats: dict, pipe, *names: str) -> int | None:
    """A counter the runtime may or may not report (the streamer does): summed over the stats dict at any
    depth (text encoder and transformer may both stream), else a pipe attribute; None when absent."""
    for name in names:
        found = _find_all(stats, name)
        if found:
            return int(sum(found))
        value = getattr(pipe, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def _h2d(stats: dict) -> int | None:
    """Bytes copied to the device in one generation under streaming: the streamed blocks' copies plus
    the resident blocks' upload (the phases load them again every generation); None without streaming."""
    parts = [_stat(stats, None, "h2d_bytes"), _stat(stats, None, "resident_load_bytes")]
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def _sample(seconds: float, passes: list[dict]) -> Sample:
    """One Sample from the stats of a generation's passes (one, or two for the hires fix)."""
    phases: dict[str, float] = {}
    for stats in passes:
        for name, s in stats["phases_s"].items():
            phases[name] = phases.get(name, 0.0) + s
    peaks = [p["peak_device_bytes"] for p in passes if p.get("peak_device_bytes") is not None]
    h2d = [_h2d(p) for p in passes]
    return Sample(
        seconds=seconds,
        steps_s=[s for p in passes for s in p["steps_s"]],
        phases_s=phases,
        peak_device_bytes=max(peaks) if peaks else None,
        h2d_bytes=None if None in h2d else sum(h2d),
    )


class OursEngine:
    """zimage-lite's Pipeline on one source folder (the reference or a converted cache folder)."""

    kind = "zimage-lite"

    def __init__(
        self,
        source: Path,
        device: str | None,
        dtype: str | None,
        vram: str | None,
        card: str | None = None,
        hires: tuple[float, float] | None = None,
        fp8_matmul: str | None = None,
        guidance: float | None = None,
        control: tuple[Path, object] | None = None,
    ):
        """`hires` (scale, strength): each generation is the hires fix, its image and latents the
        second pass's, its timings both passes together. `guidance`: the CFG scale (None: the model's).
        `control` (ControlNet file, control image): every generation runs under that control at 0.75."""
        from zimage_lite.pipeline import Pipeline

        self.hires = hires
        self.guidance = guidance
        self.control = {} if control is None else {"control_image": control[1], "control_scale": 0.75}
        self.vram = {"requested": vram, "applied": vram is not None, "note": None, "card": card}
        self.pipe = Pipeline.load(
            source, device=device, dtype=dtype, vram=vram, card=card, fp8_matmul=fp8_matmul or "dequant",
            controlnet=None if control is None else control[0],
        )  # fmt: skip
        self.load_seconds = self.pipe.load_seconds
        self.compute_dtype = str(self.pipe.dtype).removeprefix("torch.")
        self.device = str(self.pipe.device)
        self.files = component_bytes(self.pipe.paths)
        self.transformer_types = tensor_types(self.pipe.paths.transformer)
        self.quantizer = file_quantizer(self.pipe.paths.transformer)

    def generate(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Generation:
        start = time.perf_counter()
        kw = dict(seed=seed, steps=steps, guidance=self.guidance, **self.control)
        latents = self.pipe.generate_latents(prompt, width=width, height=height, **kw)
        image = self.pipe.decode(latents)[0]
        passes = [self.pipe.last_stats.to_dict()]
        if self.hires is not None:
            from zimage_lite.init_image import upscaled_size

            scale, strength = self.hires
            w, h = upscaled_size(width, height, scale)
            latents = self.pipe.generate_latents(
                prompt, width=w, height=h, image=image, strength=strength, **kw
            )
            image = self.pipe.decode(latents)[0]
            passes.append(self.pipe.last_stats.to_dict())
        seconds = time.perf_counter() - start  # decode ends with a device->host copy: synchronised
        return Generation(latents.float().cpu().numpy(), image, _sample(seconds, passes))

    def pinned_host_bytes(self) -> int | None:
        return _stat(self.pipe.last_stats.to_dict(), self.pipe, "pinned_host_bytes")

    def close(self) -> None:
        card = self.vram["card"] is not None and self.pipe.device.type == "cuda"
        del self.pipe
        free_device_memory()
        if card:  # lift the emulated card's allocator cap for the next row
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0)
