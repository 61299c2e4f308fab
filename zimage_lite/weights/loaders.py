"""Load each model component from whatever layout it comes in, into a model built on the meta device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from zimage_lite.errors import CheckpointError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.weights.load import build_meta, check_keys, load_strict
from zimage_lite.weights.names_dit import dit_config_for, dit_key_plan, dit_shapes, load_dit_tensors
from zimage_lite.weights.safetensors_io import SafetensorsSource

log = logging.getLogger(__name__)


def _is_dit(keys: list[str]) -> bool:
    return any(k.endswith(("x_pad_token", "cap_pad_token")) for k in keys)


def load_transformer(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> ZImageDiT:
    """A diffusers `transformer/` folder or a single safetensors file (diffusers or ComfyUI names)."""
    path = Path(path)
    source = SafetensorsSource.open(path)
    keys = source.keys()
    if not _is_dit(keys):
        raise CheckpointError(f"{path}: not a Z-Image transformer (no x_pad_token/cap_pad_token tensors)")
    plan = dit_key_plan(keys)
    shapes = dit_shapes(source, plan)
    cfg = dit_config_for(path, shapes)
    model = build_meta(lambda: ZImageDiT(cfg))
    # check names and shapes before reading any data, so a wrong file fails fast and names the tensors
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, f"{path}: transformer")
    tensors = {name: load_dit_tensors(source, plan, name).to(device=device, dtype=dtype) for name in plan}
    log.info("transformer: %s (%d tensors, dim %d, %d layers)", path, len(tensors), cfg.dim, cfg.n_layers)
    return load_strict(model, tensors, f"{path}: transformer")


def load_tokenizer(path: str | Path):
    """tokenizer.json (file, `tokenizer/` folder or model root)."""
    from zimage_lite.text import PromptTokenizer

    return PromptTokenizer.from_file(path)


def load_text_encoder(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    from zimage_lite.models.qwen3 import load_text_encoder as load_qwen3_safetensors

    return load_qwen3_safetensors(path, dtype, device)


def load_vae(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    from zimage_lite.weights.names_vae import load_vae as load_vae_safetensors

    return load_vae_safetensors(path, dtype, device)
