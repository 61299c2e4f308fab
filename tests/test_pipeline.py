"""Whole-pipeline parity with diffusers' ZImagePipeline on the tiny synthetic model, same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from safetensors.torch import save_file

from zimage_lite.pipeline import Pipeline
from zimage_lite.sampling import turbo_sigmas
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.names_dit import dit_key_plan, load_dit_tensors
from zimage_lite.weights.names_vae import vae_to_original
from zimage_lite.weights.safetensors import SafetensorsCheckpoint as SafetensorsSource


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def reference(tiny):
    return ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)


def reference_images(ref, prompt, seed, steps, width, height, batch):
    gen = torch.Generator("cpu").manual_seed(seed)
    return ref(
        prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
        num_images_per_prompt=batch, generator=gen,
    ).images  # fmt: skip


def max_pixel_diff(ours, theirs) -> int:
    assert len(ours) == len(theirs)
    diffs = []
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
        assert a.shape == b.shape
        diffs.append(int(np.abs(a - b).max()))
    return max(diffs)


@pytest.mark.parametrize(
    "prompt,width,height,batch,steps",
    [
        ("a red fox in the snow", 64, 64, 1, 8),
        ("一只猫坐在窗台上, watching the rain", 80, 48, 2, 8),  # non-square, Chinese + English, batch 2
        ("x " * 40, 48, 96, 1, 4),  # caption length above 32 tokens, other step count
    ],
)
def test_images_match_diffusers_fp32(tiny, reference, prompt, width, height, batch, steps):
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32")
    ours = pipe.generate(prompt, seed=7, steps=steps, width=width, height=height, batch=batch)
    theirs = reference_images(reference, prompt, 7, steps, width, height, batch)
    assert ours[0].size == (width, height)
    assert max_pixel_diff(ours, theirs) <= 1
    # the images are not trivially flat (a broken model could agree on a constant image)
    assert np.asarray(ours[0]).std() > 5


def test_two_prompts_in_one_batch(tiny, reference):
    """Different caption lengths in one batch exercise the attention masks."""
    prompts = ["short", "a considerably longer prompt with many more words in it, to change its length"]
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32")
    ours = pipe.generate(prompts, seed=3, steps=8, width=64, height=64)
    theirs = reference_images(reference, prompts, 3, 8, 64, 64, 1)
    assert max_pixel_diff(ours, theirs) <= 1


def test_bfloat16_close_to_float32(tiny):
    # bf16 rounds activations to 8 mantissa bits at every layer; over 8 steps of a random model the
    # image drifts by a few levels. We require a mean absolute difference under 3 levels (of 255).
    pipe32 = Pipeline.load(tiny, device="cpu", dtype="float32")
    pipe16 = Pipeline.load(tiny, device="cpu", dtype="bfloat16")
    a = np.asarray(pipe32.generate("a boat", seed=1, width=64, height=64)[0]).astype(float)
    b = np.asarray(pipe16.generate("a boat", seed=1, width=64, height=64)[0]).astype(float)
    assert np.abs(a - b).mean() < 3.0


def test_sigmas_match_diffusers_scheduler(reference):
    sched = reference.scheduler
    for steps in (1, 4, 8, 9):
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
        assert torch.equal(turbo_sigmas(steps), sched.sigmas)


def test_comfy_single_files_match_diffusers_folder(tiny, tmp_path):
    """ComfyUI single files (original names, prefixes) give exactly the diffusers-folder images."""
    src = SafetensorsSource.open(tiny / "transformer")
    plan = dit_key_plan(src.keys())
    comfy_dit = {"model.diffusion_model." + n: load_dit_tensors(src, plan, n) for n in plan}
    save_file(comfy_dit, str(tmp_path / "z_image_turbo.safetensors"))
    te = SafetensorsSource.open(tiny / "text_encoder")
    save_file({"model." + k: te.get(k) for k in te.keys()}, str(tmp_path / "qwen_3_4b.safetensors"))
    vae = SafetensorsSource.open(tiny / "vae")
    save_file(vae_to_original({k: vae.get(k) for k in vae.keys()}), str(tmp_path / "ae.safetensors"))

    folder = Pipeline.load(tiny, device="cpu")
    files = Pipeline.load(
        None, transformer=tmp_path / "z_image_turbo.safetensors", text_encoder=tmp_path / "qwen_3_4b.safetensors",
        vae=tmp_path / "ae.safetensors", tokenizer=tiny / "tokenizer", device="cpu",
    )  # fmt: skip
    a = folder.generate_latents("a lighthouse", seed=5, width=64, height=48)
    b = files.generate_latents("a lighthouse", seed=5, width=64, height=48)
    assert torch.equal(a, b)
    assert np.array_equal(np.asarray(folder.decode(a)[0]), np.asarray(files.decode(b)[0]))


@pytest.mark.gpu
def test_bfloat16_on_cuda_matches_diffusers(tiny):
    # Same dtype and device on both sides: differences come from kernel choice only (SDPA backend,
    # cuBLAS split-K), so we allow 2 levels max and a mean under 0.5 levels.
    ref = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.bfloat16).to("cuda")
    pipe = Pipeline.load(tiny, device="cuda", dtype="bfloat16")
    ours = pipe.generate("a lighthouse", seed=2, width=128, height=128)
    gen = torch.Generator("cpu").manual_seed(2)
    theirs = ref(
        "a lighthouse", height=128, width=128, num_inference_steps=8, guidance_scale=0.0, generator=gen
    ).images
    a, b = np.asarray(ours[0]).astype(int), np.asarray(theirs[0]).astype(int)
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.5
    assert pipe.last_stats.peak_device_bytes > 0


@pytest.mark.parametrize(
    "capability,expected", [((9, 0), torch.bfloat16), ((7, 5), torch.float16), ((6, 1), torch.float32)]
)
def test_compute_dtype_follows_the_card(monkeypatch, capability, expected):
    from zimage_lite.pipeline import default_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert default_dtype(torch.device("cuda")) == expected


def test_bfloat16_on_a_pascal_card_is_refused(monkeypatch, tiny):
    from zimage_lite.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1))
    with pytest.raises(UsageError, match="no bfloat16 support"):
        Pipeline.load(tiny, device="cuda", dtype="bfloat16")
