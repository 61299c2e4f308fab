"""The FLUX VAE against diffusers' AutoencoderKL, VaeImageProcessor and convert_ldm_vae_checkpoint.

Tiny random VAEs (widths 32/64, 16 latent channels) with every parameter perturbed (norm weights away
from 1, biases away from 0) so that a wrongly wired or ignored tensor changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from zimage_lite.config import VAEConfig
from zimage_lite.errors import CheckpointError
from zimage_lite.weights.names_vae import (
    is_original_vae,
    load_vae,
    vae_config_from_shapes,
    vae_from_original,
    vae_to_original,
)

REFERENCE_CONFIG = Path(__file__).parent / "data" / "reference-configs" / "vae.json"  # see data/README.md
LATENT_HW = (6, 10)  # non-square on purpose


def _tiny_diffusers_vae(layers_per_block: int, groups: int = 8, attention: bool = True) -> AutoencoderKL:
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=attention,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:  # GroupNorm affine: 1 / 0 at init would hide a missing weight/bias
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p))
    return vae


def _saved(vae: AutoencoderKL, tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _diffusers_pixels(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """ZImagePipeline's decode tail followed by VaeImageProcessor.postprocess to PIL."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = VaeImageProcessor(vae_scale_factor=4).postprocess(vae.decode(z).sample, output_type="pil")
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("layers_per_block", [1, 2])
@torch.no_grad()
def test_decode_and_encode_match_diffusers_float32(tmp_path, layers_per_block):
    ref = _tiny_diffusers_vae(layers_per_block)
    ours = load_vae(_saved(ref, tmp_path))
    assert ours.config == VAEConfig.from_dict(dict(ref.config))

    z = torch.randn(2, 16, *LATENT_HW)
    image = ours.decode(z)
    assert image.shape == (2, 3, 12, 20)
    assert _rel_err(image, ref.decode(z).sample) <= 1e-5

    x = torch.rand(2, 3, 12, 20) * 2 - 1
    mean = ours.encode(x)
    assert mean.shape == (2, 16, *LATENT_HW)
    assert _rel_err(mean, ref.encode(x).latent_dist.mean) <= 1e-5


@torch.no_grad()
def test_without_mid_attention(tmp_path):
    ref = _tiny_diffusers_vae(1, attention=False)
    ours = load_vae(_saved(ref, tmp_path))
    z = torch.randn(1, 16, *LATENT_HW)
    assert _rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5


# bf16 keeps 8 significant bits (2**-9 relative per rounding), fp16 11 bits (2**-12); ~20 layers of
# norm/conv accumulate such roundings. The bounds are a few times the error observed (2.2% and 0.2%).
@pytest.mark.parametrize("dtype, tol_vs_fp32", [(torch.bfloat16, 0.06), (torch.float16, 0.008)])
@torch.no_grad()
def test_half_precision_decode(tmp_path, dtype, tol_vs_fp32):
    ref = _tiny_diffusers_vae(2)
    folder = _saved(ref, tmp_path)
    ours = load_vae(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    z = torch.randn(1, 16, *LATENT_HW)
    image = ours.decode(z)
    assert image.dtype == dtype
    # Against diffusers in the same dtype: the same torch ops in the same order, so the results agree to
    # within one rounding of the output (2**-8 relative for bf16), in practice exactly.
    assert _rel_err(image, ref.to(dtype).decode(z.to(dtype)).sample) <= 2**-8
    assert _rel_err(image, load_vae(folder).decode(z)) <= tol_vs_fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_uint8_pixels_equal_image_processor(tmp_path, dtype):
    ref = _tiny_diffusers_vae(1)
    ours = load_vae(_saved(ref, tmp_path), dtype=dtype)
    # latents scaled like the sampler's, so that the decoded image spans (and exceeds) [-1, 1]
    z = torch.randn(2, 16, *LATENT_HW) * 2
    pixels = ours.decode_to_uint8(z)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 12, 20, 3)
    expected = _diffusers_pixels(ref.to(dtype), z)
    assert len(np.unique(expected)) > 100  # a real image, not saturated
    np.testing.assert_array_equal(pixels.numpy(), expected)


@torch.no_grad()
def test_original_names_round_trip(tmp_path):
    ref = _tiny_diffusers_vae(2)
    folder = _saved(ref, tmp_path)
    original = vae_to_original(ref.state_dict())
    assert is_original_vae(original) and not is_original_vae(ref.state_dict())
    assert original["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # decoder.up.1 is the widest level, run first: diffusers' up_blocks.0
    assert torch.equal(
        original["decoder.up.1.block.0.norm1.weight"], ref.decoder.up_blocks[0].resnets[0].norm1.weight
    )
    assert "encoder.down.0.downsample.conv.weight" in original and "decoder.norm_out.bias" in original
    # diffusers' own LDM converter must undo our renaming tensor for tensor (q/k/v mix-ups included)
    back = convert_ldm_vae_checkpoint(original, dict(ref.config))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "ae.safetensors")

    # 8 norm groups are invisible in shapes, so this tiny model needs its config passed
    from_folder = load_vae(folder)
    from_file = load_vae(tmp_path / "ae.safetensors", config=from_folder.config)
    z = torch.randn(1, 16, *LATENT_HW)
    assert torch.equal(from_file.decode(z), from_folder.decode(z))
    assert torch.equal(
        vae_from_original(original)["decoder.mid_block.attentions.0.to_q.weight"],
        ref.decoder.mid_block.attentions[0].to_q.weight,
    )


@torch.no_grad()
def test_original_file_without_config_infers_it(tmp_path):
    ref = _tiny_diffusers_vae(1, groups=32)
    original = vae_to_original(ref.state_dict())
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "ae.safetensors")
    ours = load_vae(tmp_path / "ae.safetensors")
    assert ours.config == VAEConfig.from_dict(dict(ref.config))
    z = torch.randn(1, 16, *LATENT_HW)
    assert _rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5
    # a single file with diffusers names loads the same way
    save_file(ref.state_dict(), tmp_path / "diffusers_named.safetensors")
    assert torch.equal(load_vae(tmp_path / "diffusers_named.safetensors").decode(z), ours.decode(z))


@torch.no_grad()
def test_names_agree_with_diffusers_converter_at_flux_size():
    """Our original names, fed to diffusers' own LDM converter, come back as diffusers' state dict."""
    config = json.loads(REFERENCE_CONFIG.read_text())
    with torch.device("meta"):
        ref = AutoencoderKL.from_config(config)
    state = ref.state_dict()
    original = vae_to_original(state)
    back = convert_ldm_vae_checkpoint(original, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert {k: tuple(v.shape) for k, v in vae_from_original(original).items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    # a few names as they appear in BFL's / ComfyUI's ae.safetensors
    assert original["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert original["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert original["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert original["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in original
    assert "encoder.down.3.downsample.conv.weight" not in original
    assert len(original) == len(state)

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert vae_config_from_shapes(shapes) == VAEConfig.from_json(REFERENCE_CONFIG)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    ref = _tiny_diffusers_vae(1)
    folder = _saved(ref, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["decoder.up_blocks.1.resnets.0.norm2.bias"]
    tensors["decoder.extra.weight"] = torch.zeros(3)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.1\.resnets\.0\.norm2\.bias") as info:
        load_vae(folder)
    assert "decoder.extra.weight" in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        load_vae(tmp_path / "empty")
