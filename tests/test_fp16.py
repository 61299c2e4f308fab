"""float16 on a model whose activations outgrow it (the fp16 stress model): diffusers' float16 gives
non-finite latents there, ours gives the float32 picture (PSNR >= 35 dB) from every weight format, in
text-to-image, image-to-image and with a LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from safetensors.torch import save_file

from zimage_lite.pipeline import Pipeline

PROMPT, SEED, STEPS, W, H = "a lighthouse on a cliff", 3, 4, 64, 48
MIN_PSNR_DB = 35.0


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def test_stress_model_reaches_the_field_magnitudes_in_float32(fp16_stress):
    """FFN products and attention outputs at 1e5-1e6, two text-encoder channels at 1e4-1e5 (float32)."""
    pipe = Pipeline.load(fp16_stress, device="cpu", dtype="float32")
    seen = {"ffn_product": 0.0, "attention_out": 0.0}

    def record(key, tensor):
        seen[key] = max(seen[key], tensor.abs().max().item())

    for name, m in pipe.transformer.named_modules():
        if name.endswith("feed_forward.w2"):
            m.register_forward_pre_hook(lambda m, args: record("ffn_product", args[0]))
        if name.endswith("attention.out"):
            m.register_forward_hook(lambda m, args, out: record("attention_out", out))
    pipe.generate_latents(PROMPT, seed=SEED, steps=STEPS, width=W, height=H)
    assert 1e5 <= seen["ffn_product"] <= 1e6 and 1e5 <= seen["attention_out"] <= 1e6, seen
    channels = pipe.encode_prompts([PROMPT])[0].abs().amax(0).sort(descending=True).values
    assert 1e4 <= channels[1] <= channels[0] <= 1e5, channels[:3]  # two massive channels ...
    assert channels[2] < 100  # ... and the rest ordinary


def test_diffusers_float16_gives_non_finite_latents(fp16_stress):
    """The stress is real: the reference implementation in float16 overflows (in float32 it does not)."""
    latents = {}
    for dtype in (torch.float16, torch.float32):
        ref = ZImagePipeline.from_pretrained(str(fp16_stress), torch_dtype=dtype)
        gen = torch.Generator("cpu").manual_seed(SEED)
        latents[dtype] = ref(
            PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=0.0, generator=gen,
            output_type="latent",
        ).images  # fmt: skip
    assert not torch.isfinite(latents[torch.float16]).all()
    assert torch.isfinite(latents[torch.float32]).all()


def _picture(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _lora_file(pipe: Pipeline, path, rank: int = 4) -> str:
    """A random LoRA (ComfyUI names) on every block's FFN and attention output, the stressed layers."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in pipe.transformer.named_modules():
        if name.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.out")):
            tensors[f"diffusion_model.{name}.lora_A.weight"] = (
                torch.randn(rank, m.in_features, generator=gen) * 0.1
            )
            tensors[f"diffusion_model.{name}.lora_B.weight"] = (
                torch.randn(m.out_features, rank, generator=gen) * 0.1
            )
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture(scope="module")
def converted(fp16_stress, tmp_path_factory):
    """The stress model as the user may have it: the diffusers folder, or converted."""
    from zimage_lite.convert.converter import convert

    root = tmp_path_factory.mktemp("fp16-converted")
    out = {"folder": fp16_stress}
    for quant in ("q8_0", "q4_k_m", "fp8"):
        out[quant] = convert(fp16_stress, root / quant, quant, progress=False).out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "q8_0", "q4_k_m", "fp8"])
def test_float16_gives_the_float32_images(converted, tmp_path, source):
    """Ours in float16 against ours in float32 on the same weights: text-to-image, image-to-image (strength
    0.6) and with a LoRA, no non-finite value on the way (a NaN step would raise or be redone in float32:
    none is redone here, the design covers these magnitudes)."""
    pipes = {dt: Pipeline.load(converted[source], device="cpu", dtype=dt) for dt in ("float32", "float16")}
    lora = _lora_file(pipes["float32"], tmp_path / "lora.safetensors")
    runs = {
        "text-to-image": {},
        "image-to-image": {"image": _picture(W, H), "strength": 0.6},
        "lora": {},
    }
    for what, kwargs in runs.items():
        images = {}
        for dt, pipe in pipes.items():
            if what == "lora":
                pipe.load_lora(lora, 0.8)
            images[dt] = pipe.generate(PROMPT, seed=SEED, steps=STEPS, width=W, height=H, **kwargs)[0]
            assert pipe.last_stats.fp32_fallback_steps == [], (source, what, dt)  # no step was redone
        assert np.asarray(images["float32"]).std() > 5  # a picture, not a flat field
        assert psnr(images["float16"], images["float32"]) >= MIN_PSNR_DB, (source, what)


def test_bench_runs_float16_rows_beside_bfloat16(fp16_stress, tmp_path):
    """`bench --also-dtype bfloat16,float16`: every precision also runs in those compute dtypes, each row
    compared with the float32 reference; on the stress model float16 is the closer of the two."""
    from zimage_lite.bench import runner
    from zimage_lite.bench.prompts import bench_prompts
    from zimage_lite.bench.schema import validate_report

    cfg = runner.BenchConfig(
        out=tmp_path / "out", model=fp16_stress, precisions=["bf16", "q8_0"], prompts=bench_prompts(1),
        steps=STEPS, width=W, height=H, warmup=0, dtype="float32", also_dtypes=["bfloat16", "float16"],
        cache=tmp_path / "cache", save_images=False, progress=False,
    )  # fmt: skip
    report = runner.run_bench(cfg)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["bf16", "q8_0", "bf16+bf16", "q8_0+bf16", "bf16+fp16", "q8_0+fp16"]
    assert [rows[n]["compute_dtype"] for n in ("bf16", "bf16+bf16", "bf16+fp16")] == [
        "float32", "bfloat16", "float16",
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["bf16+fp16"]["quality"]["psnr_db_min"] >= MIN_PSNR_DB
    assert rows["bf16+fp16"]["quality"]["psnr_db_min"] > rows["bf16+bf16"]["quality"]["psnr_db_min"]
    assert rows["bf16+fp16"]["fp32_fallback_steps"] == 0
    assert report["settings"]["also_dtypes"] == ["bfloat16", "float16"] and validate_report(report) == []
