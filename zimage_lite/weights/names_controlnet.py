"""Fun-Controlnet-Union checkpoints: key names, version detection, loading.

Layouts read: alibaba-pai's single safetensors files (diffusers names inside: `to_q/to_k/to_v`,
`to_out.0`, `norm_q/norm_k`, `control_all_x_embedder.2-1.`), diffusers `ZImageControlNetModel` folders
(the same names plus a config.json), and our converted files (our names, safetensors/FP8/GGUF). Names are
mapped with the DiT's plan (names_dit.py), so a ComfyUI `model.diffusion_model.` prefix is accepted too.

Versions, from the tensors (as diffusers' single-file detection, plus 2.1-lite by its block count):
- v1: `control_x_embedder` takes 16 * 4 inputs; 6 control blocks; plain control refiner blocks;
- 2.x: 33 * 4 inputs; 2.0 when `control_noise_refiner.0.before_proj.weight` is absent or all zero (its
  refiner blocks are untrained and unused, and are dropped), else 2.1 (15 control blocks) or 2.1-lite (3).
A diffusers folder's config.json gives the places instead of the version table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from zimage_lite.config import CONTROLNET_VERSIONS, ControlNetConfig
from zimage_lite.errors import CheckpointError, ConfigError
from zimage_lite.weights.names_dit import dit_key_plan, dit_shapes

log = logging.getLogger(__name__)

EMBEDDER = "control_x_embedder.weight"
REFINER_BEFORE = "control_noise_refiner.0.before_proj.weight"
BLOCKS = {"v1": 6, "2.0": 15, "2.1": 15, "2.1-lite": 3}
DIFFUSERS_MODES = {None: "v1", "control_layers": "2.0", "control_noise_refiner": "2.1"}
CONTROLNET_KEY = "zimage_lite.controlnet"  # our converted files: JSON {version, places, refiner_places}


def is_controlnet(keys) -> bool:
    return any(k.endswith(("control_all_x_embedder.2-1.weight", EMBEDDER)) for k in keys)


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})


def _diffusers_config(path: Path) -> dict | None:
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    values = json.loads(cfg.read_text(encoding="utf-8"))
    return values if values.get("_class_name") == "ZImageControlNetModel" else None


def _refiner_is_zero(source, plan) -> bool:
    keys = plan.get(REFINER_BEFORE)
    return keys is None or not bool(torch.any(source.get(keys[0]).float() != 0))


def detect_version(source, plan, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The version a file's tensors say (module docstring); CheckpointError for an unknown layout."""
    in_dim = shapes[EMBEDDER][1] // 4
    blocks = _count(shapes, "control_layers")
    if in_dim == 16:
        version = "v1"
    elif in_dim == 33:
        version = "2.0" if _refiner_is_zero(source, plan) else "2.1" if blocks == 15 else "2.1-lite"
    else:
        raise CheckpointError(f"unknown ControlNet layout: {in_dim} control input channels (16 or 33 known)")
    if blocks != BLOCKS[version]:
        raise CheckpointError(f"unknown ControlNet layout: {version}-style with {blocks} control blocks")
    return version


def controlnet_config(path: Path, source, plan, shapes) -> ControlNetConfig:
    dim = shapes[EMBEDDER][0]
    heads = dim // shapes["control_layers.0.attention.q_norm.weight"][0]
    values = _diffusers_config(path)
    ours = source.field(CONTROLNET_KEY)
    try:
        if ours is not None:
            values = json.loads(str(ours))
            version, places, refiner = (
                values["version"],
                tuple(values["places"]),
                tuple(values["refiner_places"]),
            )
        elif values is not None:
            version = DIFFUSERS_MODES.get(values.get("add_control_noise_refiner"), "?")
            if version == "2.1" and len(values["control_layers_places"]) == 3:
                version = "2.1-lite"
            places = tuple(values["control_layers_places"])
            refiner = tuple(values.get("control_refiner_layers_places") or ())
        else:
            version = detect_version(source, plan, shapes)
            places = CONTROLNET_VERSIONS[version]["places"]
            refiner = CONTROLNET_VERSIONS[version]["refiner_places"]
        return ControlNetConfig(
            version=version, dim=dim, n_heads=heads, control_in_dim=shapes[EMBEDDER][1] // 4, places=places,
            refiner_places=refiner, n_refiner_blocks=0 if version == "2.0" else _count(shapes, "control_noise_refiner"),
        )  # fmt: skip
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unknown ControlNet layout ({exc})") from None


def controlnet_plan(keys) -> dict[str, tuple[str, ...]]:
    """Our names -> source keys (the DiT's renames)."""
    return dit_key_plan(keys)


def read_controlnet(path: str | Path):
    """(source, plan, shapes, config) of a ControlNet checkpoint, before any weight is read
    (2.0's detection reads one tensor)."""
    from zimage_lite.weights.checkpoint import open_checkpoint

    path = Path(path)
    source = open_checkpoint(path)
    if not is_controlnet(source.keys()):
        raise CheckpointError(f"{path}: not a Z-Image ControlNet (no control_all_x_embedder tensor)")
    plan = controlnet_plan(source.keys())
    shapes = dit_shapes(source, plan)
    if "control_layers.0.attention.q_norm.weight" not in shapes:
        raise CheckpointError(f"{path}: unknown ControlNet layout (no control_layers.0 block)")
    cfg = controlnet_config(path, source, plan, shapes)
    if cfg.version == "2.0":  # the untrained refiner blocks 2.0 never runs (as diffusers drops them)
        plan = {k: v for k, v in plan.items() if not k.startswith("control_noise_refiner.")}
        shapes = {k: v for k, v in shapes.items() if k in plan}
    return source, plan, shapes, cfg


def load_controlnet(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """A ZImageControlNet from any layout above, built on meta and loaded strictly (quantized linears
    stay quantized, as the transformer's)."""
    from zimage_lite.models.controlnet import ZImageControlNet
    from zimage_lite.weights.load import build_meta
    from zimage_lite.weights.loaders import materialize, protect_fp16

    source, plan, shapes, cfg = read_controlnet(path)
    model = build_meta(lambda: ZImageControlNet(cfg))
    log.info("ControlNet %s: %s (%d blocks, hints after layers %s)", cfg.version, path, len(cfg.places),
             list(cfg.places))  # fmt: skip
    model = materialize(model, source, plan, shapes, f"{path}: ControlNet {cfg.version}", dtype, device)
    if dtype == torch.float16:
        protect_fp16(model)
    return model.eval()
