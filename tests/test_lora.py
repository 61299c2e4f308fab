"""LoRAs: parity with diffusers' `load_lora_weights` + `set_adapters` on the tiny model, in every file layout
diffusers reads; fused-qkv files; bad files refused without side effects; LoRAs beside Q8_0 weights."""

from __future__ import annotations

import json

import numpy as np
import peft  # noqa: F401  diffusers' LoRA loading needs it: a missing test dependency fails here
import pytest
import torch
from diffusers import ZImagePipeline
from safetensors import safe_open
from safetensors.torch import save_file

from zimage_lite.errors import CheckpointError
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model

PROMPT, SEED, W, H = "a cabin by a lake", 4, 64, 48
# diffusers module names the random LoRA covers: split q/k/v, out, FFN, modulation, embedders, final layer
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")  # fmt: skip
TOP_LEVEL = ("all_x_embedder.2-1", "all_final_layer.2-1.linear", "t_embedder.mlp.2", "cap_embedder.1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def linears(tiny):
    """diffusers module name -> (out, in) of the tiny transformer's LoRA targets."""
    ref = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    out = {}
    for name, m in ref.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and (name.endswith(TARGETS) or name in TOP_LEVEL):
            out[name] = (m.out_features, m.in_features)
    return out


def random_lora(linears, rank=4, seed=0, std=0.25) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module name -> (A (r, in), B (out, r)); ranks differ between layers on purpose."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, (n_out, n_in)) in enumerate(sorted(linears.items())):
        r = rank + (i % 3)
        a = torch.randn(r, n_in, generator=gen) * std
        lora[name] = (a, torch.randn(n_out, r, generator=gen) * std)
    return lora


def peft_layout(lora) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        out[f"transformer.{name}.lora_A.weight"] = a
        out[f"transformer.{name}.lora_B.weight"] = b
    return out


def kohya_layout(lora, alpha_over_rank=2.0) -> dict[str, torch.Tensor]:
    """`lora_unet_` + underscores, lora_down/lora_up, an alpha per module (up divided to compensate)."""
    out = {}
    for name, (a, b) in lora.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a
        out[f"{key}.lora_up.weight"] = b / alpha_over_rank
        out[f"{key}.alpha"] = torch.tensor(alpha_over_rank * a.shape[0])
    return out


def comfy_layout(lora) -> dict[str, torch.Tensor]:
    """`diffusion_model.` prefix and original module names: `attention.out`, `x_embedder`, `final_layer`."""
    from zimage_lite.weights.names_dit import dit_key_plan

    out = {}
    for name, (a, b) in lora.items():
        ours = next(iter(dit_key_plan([name + ".weight"])))[: -len(".weight")]
        out[f"diffusion_model.{ours}.lora_A.weight"] = a
        out[f"diffusion_model.{ours}.lora_B.weight"] = b
    return out


def save(tmp_path, name, tensors) -> str:
    path = tmp_path / name
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def reference_image(ref):
    gen = torch.Generator("cpu").manual_seed(SEED)
    img = ref(PROMPT, height=H, width=W, num_inference_steps=8, guidance_scale=0.0, generator=gen).images[0]
    return np.asarray(img).astype(int)


def diffusers_image(tiny, lora_file, scale):
    ref = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    ref.load_lora_weights(lora_file, adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[scale])
    return reference_image(ref)


def our_image(pipe):
    return np.asarray(pipe.generate(PROMPT, seed=SEED, width=W, height=H)[0]).astype(int)


@pytest.mark.parametrize("layout", [peft_layout, kohya_layout])
def test_lora_matches_diffusers_fp32(tiny, linears, tmp_path, layout):
    path = save(tmp_path, "style.safetensors", layout(random_lora(linears)))
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32")
    base = our_image(pipe)
    pipe.load_lora(path, 0.8)
    ours, theirs = our_image(pipe), diffusers_image(tiny, path, 0.8)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - base).mean() > 2  # the LoRA changes the image
    pipe.unload_loras()
    assert np.array_equal(our_image(pipe), base)


def test_diffusers_saved_lora_with_alpha_only_in_its_metadata(tiny, linears, tmp_path):
    """`ZImagePipeline.save_lora_weights` keeps alpha in the file's `lora_adapter_metadata` (PEFT's
    LoraConfig), not in tensors: lora_alpha 3x the rank, one module 0.5x by alpha_pattern. Reading the
    file without its metadata would scale every update by 1 instead."""
    rank = 4
    lora = {
        n: (a[:rank], b[:, :rank].contiguous())
        for n, (a, b) in random_lora(linears, rank=rank, seed=8).items()
    }
    layers = {
        f"{name}.{ab}.weight": t for name, (a, b) in lora.items() for ab, t in (("lora_A", a), ("lora_B", b))
    }
    metadata = {"r": rank, "lora_alpha": 3.0 * rank, "target_modules": sorted(lora),
                "alpha_pattern": {"layers.1.feed_forward.w2": 0.5 * rank}, "rank_pattern": {}}  # fmt: skip
    ZImagePipeline.save_lora_weights(tmp_path / "saved", transformer_lora_layers=layers,
                                     transformer_lora_adapter_metadata=metadata)  # fmt: skip
    path = str(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        assert not any("alpha" in k for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 3.0 * rank
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32")
    pipe.load_lora(path, 0.6)
    ours, theirs = our_image(pipe), diffusers_image(tiny, path, 0.6)
    assert np.abs(ours - theirs).max() <= 1
    pipe.unload_loras()
    plain = save(tmp_path, "no-metadata.safetensors", peft_layout(lora))  # the same tensors, alpha = rank
    pipe.load_lora(plain, 0.6)
    assert np.abs(our_image(pipe) - theirs).max() > 8  # the metadata's alpha is what makes them agree


def test_comfy_names_and_two_loras(tiny, linears, tmp_path):
    """Original names with a `diffusion_model.` prefix read as the PEFT file; two LoRAs add up."""
    first, second = random_lora(linears, seed=1), random_lora(linears, rank=2, seed=2)
    peft_file = save(tmp_path, "a.safetensors", peft_layout(first))
    comfy_file = save(tmp_path, "b.safetensors", comfy_layout(first))
    other_file = save(tmp_path, "c.safetensors", peft_layout(second))
    a = Pipeline.load(tiny, device="cpu", dtype="float32")
    b = Pipeline.load(tiny, device="cpu", dtype="float32")
    a.load_lora(peft_file, 0.5)
    b.load_lora(comfy_file, 0.5)
    assert np.array_equal(our_image(a), our_image(b))

    ref = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    ref.load_lora_weights(peft_file, adapter_name="a")
    ref.load_lora_weights(other_file, adapter_name="c")
    ref.set_adapters(["a", "c"], adapter_weights=[0.5, 1.5])
    theirs = reference_image(ref)
    a.load_lora(other_file, 1.5)
    assert np.abs(our_image(a) - theirs).max() <= 1


def shared_qkv_lora(linears, seed):
    """Block-level layers only; q, k and v share one A and one rank (what a fused pair expresses)."""
    lora = random_lora({k: v for k, v in linears.items() if k not in TOP_LEVEL}, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in [k for k in lora if k.endswith(".to_q")]:
        a = lora[name][0]
        for p in "qkv":
            key = name[: -len("q")] + p
            lora[key] = (a, torch.randn(lora[key][1].shape[0], a.shape[0], generator=gen) * 0.25)
    return lora


def fused_dot_layout(lora) -> dict[str, torch.Tensor]:
    """Original names, one `attention.qkv` pair per layer, `.lora.down.weight` keys (Anime-Z style)."""
    out = {}
    for name, (a, b) in lora.items():
        if name.endswith((".to_k", ".to_v")):
            continue
        if name.endswith(".to_q"):
            base = name[: -len(".to_q")]
            name, b = base + ".qkv", torch.cat([lora[f"{base}.to_{p}"][1] for p in "qkv"])
        name = name.replace(".to_out.0", ".out")
        out[f"diffusion_model.{name}.lora.down.weight"] = a
        out[f"diffusion_model.{name}.lora.up.weight"] = b
    return out


def test_fused_qkv_lora_equals_split(tiny, linears, tmp_path):
    """A fused-qkv pair (one A, B of 3*dim rows) is the split LoRA with A shared and B in thirds;
    diffusers reads the fused pair in the dot layout and splits it the same way."""
    lora = shared_qkv_lora(linears, seed=3)
    fused_file = save(tmp_path, "fused.safetensors", fused_dot_layout(lora))
    split_file = save(tmp_path, "split.safetensors", peft_layout(lora))
    a = Pipeline.load(tiny, device="cpu", dtype="float32")
    b = Pipeline.load(tiny, device="cpu", dtype="float32")
    a.load_lora(fused_file)
    b.load_lora(split_file)
    ours = our_image(a)
    assert np.abs(ours - our_image(b)).max() <= 1
    assert np.abs(ours - diffusers_image(tiny, fused_file, 1.0)).max() <= 1


def _corrupt(tensors, how):
    key = "transformer.layers.0.feed_forward.w1.lora_A.weight"
    if how == "rank":
        tensors[key] = tensors[key][:-1]
        return tensors, key.replace("lora_A", "lora_B")
    if how == "shape":
        tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
        return tensors, key
    if how == "unknown":
        bad = key.replace("layers.0.", "layers.99.")
        tensors[bad] = tensors[key]
        return tensors, bad
    bad = key.replace("lora_A.weight", "dora_scale")
    tensors[bad] = torch.ones(1)
    return tensors, bad


@pytest.mark.parametrize("how", ["rank", "shape", "unknown", "not_lora"])
def test_bad_lora_names_the_key_and_changes_nothing(tiny, linears, tmp_path, how):
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32")
    good = save(tmp_path, "good.safetensors", peft_layout(random_lora(linears, seed=5)))
    pipe.load_lora(good, 0.7)
    before = our_image(pipe)
    tensors, key = _corrupt(peft_layout(random_lora(linears, seed=6)), how)
    bad = save(tmp_path, "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as err:
        pipe.load_lora(bad)
    assert key in str(err.value) and "\n" not in str(err.value)
    assert len(pipe.loras) == 1
    assert np.array_equal(our_image(pipe), before)


@pytest.mark.parametrize("dtype,qtype", [("float32", "Q8_0"), ("float32", "FP8_E4M3"), ("bfloat16", None)])
def test_lora_on_quantized_or_bf16_weights_has_the_same_effect(tiny, linears, tmp_path, dtype, qtype):
    """On Q8_0 / FP8 linears the LoRA runs beside the quantized matmul, in bf16 beside the bf16 one; its
    effect on the image (with minus without) correlates with the float32 one."""
    from zimage_lite.runtime.quant_linear import QuantLinear, swap_linears

    path = save(tmp_path, "style.safetensors", peft_layout(random_lora(linears, seed=7)))
    effects = []
    for precision, quantize in (("float32", None), (dtype, qtype)):
        pipe = Pipeline.load(tiny, device="cpu", dtype=precision)
        if quantize:
            qtypes = {
                n: quantize
                for n, m in pipe.transformer.named_modules()
                if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0 and n.startswith("layers.")
            }
            swap_linears(pipe.transformer, qtypes, torch.float32)
            assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
        base = our_image(pipe).astype(float)
        pipe.load_lora(path, 0.8)
        effects.append((our_image(pipe) - base).ravel())
    corr = np.corrcoef(effects[0], effects[1])[0, 1]
    assert corr > 0.95, corr
