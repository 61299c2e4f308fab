"""External baselines in the same run: diffusers' ZImagePipeline on the same reference folder.

Rows (all compared with our reference row like any other):
- diffusers-bf16: the whole pipeline on the device, bf16 on CUDA (float32 on a CPU, as our reference);
- diffusers-offload (CUDA only): the same with diffusers' block-level group offloading, one block per
  group on a side stream. diffusers takes no VRAM cap, so this is its lowest-memory streaming setup;
  the peak it reaches is measured, not enforced;
- diffusers-gguf-<quant> (CUDA only): diffusers' GGUF loader on the transformer file of our converted
  folder for each requested GGUF precision (not fp8 or the reference).
A row that cannot run here is recorded as skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
import warnings
from pathlib import Path

from zimage_lite.bench import sources
from zimage_lite.bench.engines import Generation, Sample, component_bytes, free_device_memory
from zimage_lite.bench.rows import RowResult

GGUF_PRECISIONS = ("q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q4_k_m", "q5_k_m")


def planned_baselines(cfg) -> list[RowResult]:
    rows = [RowResult("diffusers-bf16", "diffusers", sources.REFERENCE)]
    rows.append(RowResult("diffusers-offload", "diffusers", sources.REFERENCE))
    rows += [RowResult(f"diffusers-gguf-{p}", "diffusers", p) for p in cfg.precisions if p in GGUF_PRECISIONS]
    reason = _unavailable(cfg)
    for row in rows:
        cuda_only = row.name != "diffusers-bf16"
        if reason or (cuda_only and not _on_cuda(cfg)):
            row.status, row.reason = "skipped", reason or "needs a CUDA device"
        elif row.name.startswith("diffusers-gguf-") and importlib.util.find_spec("accelerate") is None:
            # diffusers refuses quantized single files without low_cpu_mem_usage, which needs accelerate
            row.status, row.reason = "skipped", "diffusers' GGUF loader needs the accelerate package"
    return rows


def _unavailable(cfg) -> str | None:
    try:
        import diffusers  # noqa: F401
        from diffusers import ZImagePipeline  # noqa: F401
    except ImportError:
        return "diffusers with ZImagePipeline is not installed"
    if cfg.model is not None and not (cfg.model / "model_index.json").is_file():
        return "the reference is not a diffusers-layout folder (no model_index.json)"
    return None


def _on_cuda(cfg) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.device != "cpu"


@contextlib.contextmanager
def _quiet_diffusers():
    """No loading bars or advice on stderr while our own progress bar runs; restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype= (older diffusers know no dtype=)
            yield
    finally:
        for lib, level in zip((dlog, tlog), levels):
            lib.set_verbosity(level)
            lib.enable_progress_bar()


def open_baseline(cfg, reference: Path, row):
    return DiffusersEngine(cfg, reference, row)


def _gguf_transformer(cfg, reference: Path, precision: str, dtype):
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from zimage_lite.weights.components import resolve_model

    folder, convert_info = sources.precision_source(reference, precision, cfg.cache, cfg.progress)
    path = resolve_model(folder, None, None, None, None).transformer
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.gguf"))), path)
    with _quiet_diffusers():
        model = ZImageTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            config=str(reference), subfolder="transformer", torch_dtype=dtype,
        )  # fmt: skip
    return model, path, convert_info


class DiffusersEngine:
    """ZImagePipeline with the same prompt, seed, size and steps (guidance 0: Turbo needs no CFG)."""

    kind = "diffusers"

    def __init__(self, cfg, reference: Path, row):
        import torch
        from diffusers import ZImagePipeline

        from zimage_lite.weights.components import resolve_model

        cuda = _on_cuda(cfg)
        self.torch_device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        start = time.perf_counter()
        extra = {}
        self.files = component_bytes(resolve_model(reference, None, None, None, None))
        if row.name.startswith("diffusers-gguf-"):
            extra["transformer"], path, row.info["convert"] = _gguf_transformer(
                cfg, reference, row.precision, dtype
            )
            self.files = {**self.files, "transformer_bytes": path.stat().st_size}
            self.files["total_bytes"] = sum(v for k, v in self.files.items() if k != "total_bytes" and v)
        with _quiet_diffusers():
            pipe = ZImagePipeline.from_pretrained(str(reference), torch_dtype=dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        if row.name == "diffusers-offload":
            pipe.enable_group_offload(
                onload_device=self.torch_device, offload_type="block_level", num_blocks_per_group=1,
                use_stream=True,
            )  # fmt: skip
        else:
            pipe.to(self.torch_device)
        self.pipe = pipe
        self.load_seconds = time.perf_counter() - start
        self.compute_dtype = str(dtype).removeprefix("torch.")
        self.device = str(self.torch_device)
        self.vram = {
            "requested": cfg.vram,
            "applied": False,
            "note": "diffusers takes no VRAM cap",
            "card": None,
        }
        self.transformer_types = None
        self.quantizer = None

    def _sync(self) -> float:
        import torch

        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def generate(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Generation:
        import torch

        if self.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks: list[float] = []
        final: dict = {}

        def on_step(pipe, i, t, kwargs):
            marks.append(self._sync())
            final["latents"] = kwargs["latents"]  # after step i: the last call holds the final latents
            return kwargs

        start = self._sync()
        image = self.pipe(
            prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step,
        ).images[0]  # fmt: skip
        end = self._sync()
        peak = torch.cuda.max_memory_allocated() if self.torch_device.type == "cuda" else None
        # the first step also holds text encoding and set-up: its time is not a step's, so only the gaps
        # between step ends count (one fewer value than steps)
        steps_s = [b - a for a, b in zip(marks, marks[1:])]
        sample = Sample(seconds=end - start, steps_s=steps_s, phases_s={}, peak_device_bytes=peak)
        return Generation(final["latents"].float().cpu().numpy(), image, sample)

    def pinned_host_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        del self.pipe
        free_device_memory()
