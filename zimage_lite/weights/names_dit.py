"""Transformer key names: diffusers <-> original/ComfyUI (ours), and loading a transformer checkpoint.

Ours are the original names (fused `attention.qkv`). Mapping, diffusers -> ours:
  all_x_embedder.2-1.      -> x_embedder.
  all_final_layer.2-1.     -> final_layer.
  attention.to_q/to_k/to_v -> attention.qkv (concatenated on dim 0 in q, k, v order)
  attention.to_out.0.      -> attention.out.
  attention.norm_q/norm_k  -> attention.q_norm/k_norm
ComfyUI files may add a `model.diffusion_model.` prefix and a stray top-level `norm_final.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from zimage_lite.config import DiTConfig
from zimage_lite.errors import CheckpointError

COMFY_PREFIX = "model.diffusion_model."
STRAY_KEYS = frozenset({"norm_final.weight"})

_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")


def _strip(key: str) -> str:
    return key[len(COMFY_PREFIX) :] if key.startswith(COMFY_PREFIX) else key


def dit_key_plan(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Our name -> the source keys that make it (several = concatenate on dim 0).

    Accepts diffusers names, original names, with or without the ComfyUI prefix; stray keys are dropped.
    """
    plan: dict[str, tuple[str, ...]] = {}
    keys = list(keys)
    present = set(keys)
    for key in keys:
        name = _strip(key)
        if name in STRAY_KEYS:
            continue
        if name.endswith(_QKV[1:]):  # to_k / to_v are gathered with their to_q
            continue
        if name.endswith(_QKV[0]):
            base = key[: -len(_QKV[0])]
            parts = tuple(base + suffix for suffix in _QKV)
            if all(p in present for p in parts):
                plan[name[: -len(_QKV[0])] + ".attention.qkv.weight"] = parts
                continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if name in plan:  # e.g. a diffusers `to_out.0` beside an original `attention.out`
            raise CheckpointError(f"tensors {plan[name][0]} and {key} are both {name}: mixed key layouts")
        plan[name] = (key,)
    # a lone to_k / to_v (without its to_q) must still surface as an unexpected key
    for key in keys:
        name = _strip(key)
        if name.endswith(_QKV[1:]) and not any(key in parts for parts in plan.values()):
            plan[name] = (key,)
    return plan


def to_diffusers_name(name: str) -> str:
    for old, new in _RENAMES:
        if new.startswith("."):
            name = name.replace(new, old)
        elif name.startswith(new):
            name = old + name[len(new) :]
    return name


def dit_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> diffusers names (q, k, v split). Used to write diffusers-layout checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".attention.qkv.weight"):
            base = name[: -len(".attention.qkv.weight")]
            for suffix, part in zip(_QKV, tensor.chunk(3, dim=0)):
                out[base + suffix] = part.contiguous()
        else:
            out[to_diffusers_name(name)] = tensor
    return out


def load_dit_tensors(source, plan: Mapping[str, tuple[str, ...]], name: str) -> torch.Tensor:
    """Materialise one of our tensors from a source (anything with `.get(key)`); works for any
    plan of the same form (our name -> source keys concatenated on dim 0), not only the DiT's."""
    parts = plan[name]
    if len(parts) == 1:
        return source.get(parts[0])
    return torch.cat([source.get(p) for p in parts], dim=0)


def dit_shapes(source, plan: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, parts in plan.items():
        first = tuple(source.shape(parts[0]))
        shapes[name] = (sum(source.shape(p)[0] for p in parts), *first[1:]) if len(parts) > 1 else first
    return shapes


def dit_config_for(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> DiTConfig:
    """config.json beside the weights (diffusers folder), else inferred from our-named shapes."""
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if cfg_file.is_file() and "ZImage" in cfg_file.read_text(encoding="utf-8", errors="replace"):
        return DiTConfig.from_json(cfg_file)
    return DiTConfig.from_shapes(shapes)
