"""FLUX VAE checkpoints: original (BFL / ComfyUI `ae.safetensors`) <-> diffusers key names, and loading.

Original names, as BFL's `flux/modules/autoencoder.py` builds them (diffusers' `convert_ldm_vae_checkpoint`
does the same renaming):

| original                              | diffusers                                            |
|---------------------------------------|------------------------------------------------------|
| `encoder.down.{i}.block.{j}.`         | `encoder.down_blocks.{i}.resnets.{j}.`               |
| `encoder.down.{i}.downsample.conv.`   | `encoder.down_blocks.{i}.downsamplers.0.conv.`       |
| `decoder.up.{i}.block.{j}.`           | `decoder.up_blocks.{n-1-i}.resnets.{j}.`             |
| `decoder.up.{i}.upsample.conv.`       | `decoder.up_blocks.{n-1-i}.upsamplers.0.conv.`       |
| `{enc,dec}oder.mid.block_{k}.`        | `{enc,dec}oder.mid_block.resnets.{k-1}.`             |
| `{enc,dec}oder.mid.attn_1.norm/q/k/v/proj_out.` | `...mid_block.attentions.0.group_norm/to_q/to_k/to_v/to_out.0.` |
| `{enc,dec}oder.norm_out.`             | `{enc,dec}oder.conv_norm_out.`                       |
| `...nin_shortcut.`                    | `...conv_shortcut.`                                  |

The original decoder numbers its up levels by resolution (`up.0` is the full-resolution, narrowest level,
run last), diffusers by execution order: hence the reversal. The original attention projections are 1x1
convs, weight (C, C, 1, 1); diffusers has Linear weights (C, C).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from zimage_lite.config import VAEConfig
from zimage_lite.errors import CheckpointError, ConfigError
from zimage_lite.models.vae import VAE
from zimage_lite.weights.load import build_meta, load_strict
from zimage_lite.weights.safetensors import SafetensorsCheckpoint

# Full-model checkpoints (SD-style) nest the VAE under one of these; ComfyUI's ae.safetensors has none.
_PREFIXES = ("first_stage_model.", "vae.")
_ATTN_ORIG = ("norm", "q", "k", "v", "proj_out")
_ATTN_DIFF = ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
_ATTN_PROJ_DIFF = ("to_q", "to_k", "to_v", "to_out.0")  # conv 1x1 in the original
_ORIGINAL_KEY = re.compile(r"^(encoder|decoder)\.(down\.\d|up\.\d|mid\.|norm_out\.)")


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_original_vae(keys: Iterable[str]) -> bool:
    """True if the keys use the original (BFL / ComfyUI / LDM) names rather than diffusers names."""
    return any(_ORIGINAL_KEY.match(_strip_prefix(k)) for k in keys)


def _n_levels(keys: Iterable[str], pattern: str) -> int:
    levels = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return 1 + max(levels) if levels else 0


def _rename_from_original(key: str, n_up: int) -> str:
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets."),
        (
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.",
        ),
        (r"^(\w+)\.mid\.block_(\d+)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (
            r"^(\w+)\.mid\.attn_1\.(\w+)\.",
            lambda m: f"{m[1]}.mid_block.attentions.0.{_swap(m[2], _ATTN_ORIG, _ATTN_DIFF)}.",
        ),
        (r"^(\w+)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def _rename_to_original(key: str, n_up: int) -> str:
    attn_diff = "|".join(re.escape(a) for a in _ATTN_DIFF)
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block."),
        (
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
        ),
        (r"^(\w+)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (
            rf"^(\w+)\.mid_block\.attentions\.0\.({attn_diff})\.",
            lambda m: f"{m[1]}.mid.attn_1.{_swap(m[2], _ATTN_DIFF, _ATTN_ORIG)}.",
        ),
        (r"^(\w+)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _swap(name: str, src: tuple[str, ...], dst: tuple[str, ...]) -> str:
    return dst[src.index(name)] if name in src else name


def _is_attn_projection_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and any(
        diffusers_key.endswith(f".{p}.weight") for p in _ATTN_PROJ_DIFF
    )


def vae_from_original(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-named VAE tensors -> diffusers names; 1x1-conv attention weights become (C, C).

    Keys that fit no rule pass through unchanged, so a strict load names them as unexpected.
    """
    stripped = {_strip_prefix(k): v for k, v in tensors.items()}
    n_up = _n_levels(stripped, r"^decoder\.up\.(\d+)\.")
    out = {}
    for key, t in stripped.items():
        new = _rename_from_original(key, n_up)
        if _is_attn_projection_weight(new) and t.ndim == 4:
            t = t.reshape(t.shape[0], t.shape[1])  # (C, C, 1, 1) -> (C, C)
        out[new] = t
    return out


def vae_to_original(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named VAE tensors -> original names, attention weights as (C, C, 1, 1) 1x1 convs."""
    n_up = _n_levels(tensors, r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, t in tensors.items():
        if _is_attn_projection_weight(key) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        out[_rename_to_original(key, n_up)] = t
    return out


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], norm_num_groups: int = 32) -> VAEConfig:
    """Infer a VAEConfig from diffusers-named shapes (the decoder's; the encoder may be absent).

    norm_num_groups is not visible in shapes: the FLUX VAE uses 32. Scaling/shift stay FLUX's defaults.
    """
    try:
        n = _n_levels(shapes, r"^decoder\.up_blocks\.(\d+)\.")
        # up_blocks.{n-1-i} outputs block_out_channels[i]
        chans = tuple(shapes[f"decoder.up_blocks.{n - 1 - i}.resnets.0.conv1.weight"][0] for i in range(n))
        n_resnets = _n_levels(shapes, r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.")
        latent_channels = shapes["decoder.conv_in.weight"][1]
        out_channels = shapes["decoder.conv_out.weight"][0]
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"cannot infer VAE config from tensor shapes: missing {exc}") from None
    if n == 0:
        raise ConfigError("cannot infer VAE config from tensor shapes: no decoder.up_blocks tensors")
    in_channels = shapes.get("encoder.conv_in.weight", (0, out_channels))[1]
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        latent_channels=latent_channels,
        block_out_channels=chans,
        layers_per_block=n_resnets - 1,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in shapes,
    )


def _read_diffusers_config(path: Path) -> VAEConfig:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read VAE config {path}: {exc}") from None
    cls = values.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL" or values.get("act_fn", "silu") != "silu":
        raise ConfigError(
            f"{path}: not a FLUX-style AutoencoderKL config (class {cls}, act_fn {values.get('act_fn')})"
        )
    if values.get("shift_factor", 0.0) is None:  # diffusers writes null for VAEs without a shift
        values["shift_factor"] = 0.0
    return VAEConfig.from_dict({k: v for k, v in values.items() if v is not None})


def _open_vae_source(path: Path) -> tuple[SafetensorsCheckpoint, VAEConfig | None]:
    """(tensors, config from config.json if there is one) for a diffusers vae/ folder or one file."""
    if path.is_dir():
        weights = path / "diffusion_pytorch_model.safetensors"
        source = SafetensorsCheckpoint.open(weights if weights.is_file() else path)
        config = path / "config.json"
        return source, (_read_diffusers_config(config) if config.is_file() else None)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such VAE file or folder")
    return SafetensorsCheckpoint.open(path), None


def load_vae(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: VAEConfig | None = None,
) -> VAE:
    """Load a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors) or a single
    safetensors file with original (ComfyUI `ae.safetensors`) or diffusers names.

    Without config.json the config is inferred from shapes (norm groups 32, FLUX scaling/shift); pass
    `config` to override. Raises CheckpointError naming missing/unexpected/misshapen tensors.
    """
    path = Path(path)
    source, file_config = _open_vae_source(path)
    tensors = {k: source.get(k) for k in source.keys()}
    if is_original_vae(tensors):
        tensors = vae_from_original(tensors)
    if config is None:
        config = file_config or vae_config_from_shapes({k: tuple(t.shape) for k, t in tensors.items()})
    model = build_meta(lambda: VAE(config))
    load_strict(model, tensors, f"VAE {path}", dtype=dtype, device=device)
    return model.eval()
