"""LoRA files for the Z-Image transformer: the layouts diffusers reads, mapped onto our module names.

Matches diffusers' `ZImageLoraLoaderMixin.lora_state_dict` (+ `_convert_non_diffusers_z_image_lora_to_diffusers`)
and PEFT's forward, `W x + (alpha / rank) * B (A x)`:
- keys `<prefix><module>.<pair>`; prefixes `transformer.`, `base_model.model.`, `diffusion_model.`,
  `model.diffusion_model.`, `lora_unet_` (kohya: the module path written with `_` for `.`);
- pairs `lora_A[.<adapter>].weight`/`lora_B...` (PEFT), `lora_down.weight`/`lora_up.weight` (kohya,
  ComfyUI), `lora.down.weight`/`lora.up.weight` (Anime-Z), each with an optional `<module>.alpha`;
- modules by diffusers names (`attention.to_q/to_k/to_v`, `to_out.0`, `all_x_embedder.2-1`, ...) or
  original ones (fused `attention.qkv`, `attention.out`, `x_embedder`, ...);
- without an alpha tensor the scale is PEFT metadata's `lora_alpha / r` if the file has it, else 1.
Where a file holds both a fused qkv (or bare `out`) pair and the split ones, diffusers uses the split
ones; so do we. Our qkv is one Linear: separate q, k, v pairs become one block-structured pair,
down = [A_q; A_k; A_v] (rq+rk+rv, in) and up = blockdiag(B_q, B_k, B_v) (3*dim, rq+rk+rv), exact.
Everything is validated before anything is returned, so a bad file changes nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zimage_lite.errors import CheckpointError, not_found
from zimage_lite.weights.names_dit import to_diffusers_name
from zimage_lite.weights.safetensors import SafetensorsCheckpoint

PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "lora_unet_")
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|lora[._](?P<du>down|up)\.weight|(?P<alpha>alpha))$"
)
_ROLE = {"A": "down", "B": "up", "down": "down", "up": "up"}
QKV = ".attention.qkv"


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: one of our linears, whole (part None) or its q/k/v third (0, 1, 2)."""

    path: str
    part: int | None
    diffusers_named: bool  # diffusers keeps these when a file names one layer twice


@dataclass(frozen=True)
class LowRank:
    """One linear's update, delta_W = up @ down, with the file's alpha / rank already folded into up."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer (nn.Linear or QuantLinear) by module path."""
    shapes = {}
    for name, m in model.named_modules():
        n_out, n_in = getattr(m, "out_features", None), getattr(m, "in_features", None)
        if isinstance(n_out, int) and isinstance(n_in, int):
            shapes[name] = (n_out, n_in)
    return shapes


def lora_targets(paths: Iterable[str]) -> dict[str, Target]:
    """Every module name a LoRA file may use (ours, diffusers', kohya's `_` form) -> its Target."""
    out: dict[str, Target] = {}
    for path in paths:
        names = [(path, None, False), (to_diffusers_name(path + ".")[:-1], None, True)]  # renames end in "."
        if path.endswith(QKV):
            base = path[: -len(".qkv")]
            names += [(f"{base}.to_{p}", i, True) for i, p in enumerate("qkv")]
            names += [(f"{base}.to.{p}", i, True) for i, p in enumerate("qkv")]
        for name, part, diffusers_named in names:
            target = Target(path, part, diffusers_named and name != path)
            out.setdefault(name, target)
            out.setdefault(name.replace(".", "_"), target)
    return out


def _strip_prefix(module: str) -> str:
    for prefix in PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def _split_key(file: Path, key: str) -> tuple[str, str]:
    m = _KEY.match(key)
    if m is None:
        raise CheckpointError(f"{file}: tensor {key} is not part of a LoRA (DoRA, LoKr, full weights?)")
    role = "alpha" if m["alpha"] else _ROLE[m["ab"] or m["du"]]
    return _strip_prefix(m["module"]), role


def _metadata_alpha(metadata: dict[str, str]) -> tuple[float, dict[str, float]] | None:
    """PEFT's (lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata`, when the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        table = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    except json.JSONDecodeError:
        return None
    if "lora_alpha" not in table:
        return None
    return float(table["lora_alpha"]), {k: float(v) for k, v in (table.get("alpha_pattern") or {}).items()}


def _alpha_for(module: str, rank: int, alpha: torch.Tensor | None, meta) -> float:
    if alpha is not None:
        return float(alpha.item())
    if meta is None:
        return float(rank)
    default, pattern = meta
    for key, value in pattern.items():  # PEFT matches a pattern key as a suffix of the module path
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _group(
    file: Path, source: SafetensorsCheckpoint, targets: dict[str, Target]
) -> dict[str, dict[str, str]]:
    """module name -> {"down": key, "up": key, "alpha": key}, every module known to the model."""
    modules: dict[str, dict[str, str]] = {}
    for key in source.keys():
        module, role = _split_key(file, key)
        if module not in targets:
            raise CheckpointError(
                f"{file}: tensor {key} is for layer {module!r}, which this transformer does not have "
                "(a LoRA for another model?)"
            )
        modules.setdefault(module, {})[role] = key
    if not modules:
        raise CheckpointError(f"{file}: no LoRA tensors in this file")
    return modules


def _pair(file: Path, source, module: str, keys: dict[str, str], shape: tuple[int, int], meta) -> LowRank:
    """One module's (down, up), checked against the target's (out, in) shape, alpha folded into up."""
    if "down" not in keys or "up" not in keys:
        missing = "up" if "down" in keys else "down"
        raise CheckpointError(f"{file}: tensor {next(iter(keys.values()))} has no matching lora_{missing}")
    down, up = source.get(keys["down"]).float(), source.get(keys["up"]).float()
    for role, t in (("down", down), ("up", up)):
        if t.ndim != 2:
            raise CheckpointError(
                f"{file}: tensor {keys[role]} is not a linear LoRA (shape {tuple(t.shape)})"
            )
    if down.shape[0] == 0:  # PEFT refuses r=0 too (LoraConfig: "r should be a positive integer")
        raise CheckpointError(
            f"{file}: tensor {keys['down']} has rank 0 (shape {tuple(down.shape)}): an empty LoRA"
        )
    if up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"{file}: rank mismatch at {keys['up']}: up is {tuple(up.shape)}, down is {tuple(down.shape)}"
        )
    if (up.shape[0], down.shape[1]) != shape:
        raise CheckpointError(
            f"{file}: tensor {keys['down']} makes a {up.shape[0]}x{down.shape[1]} update, layer {module!r} "
            f"is {shape[0]}x{shape[1]} (a LoRA for another model size?)"
        )
    alpha = source.get(keys["alpha"]) if "alpha" in keys else None
    for key, t in ((keys["down"], down), (keys["up"], up), (keys.get("alpha"), alpha)):
        if t is not None and not torch.isfinite(t).all():
            raise CheckpointError(f"{file}: tensor {key} holds NaN or infinity")
    if alpha is not None and alpha.numel() != 1:
        raise CheckpointError(
            f"{file}: tensor {keys['alpha']} should be one number (shape {tuple(alpha.shape)})"
        )
    scale = _alpha_for(module, down.shape[0], alpha, meta) / down.shape[0]
    if not math.isfinite(scale):  # a NaN alpha in the PEFT metadata
        raise CheckpointError(f"{file}: the alpha of layer {module!r} is not a finite number")
    return LowRank(down, up * scale)


def _block_diagonal(parts: dict[int, LowRank], out_features: int) -> LowRank:
    """q/k/v pairs of a fused qkv -> one pair: stacked downs, block-diagonal up (zeros elsewhere)."""
    third = out_features // 3
    downs = [parts[i].down for i in sorted(parts)]
    up = torch.zeros(out_features, sum(d.shape[0] for d in downs))
    col = 0
    for i in sorted(parts):
        rank = parts[i].down.shape[0]
        up[i * third : (i + 1) * third, col : col + rank] = parts[i].up  # (dim, rank) block
        col += rank
    return LowRank(torch.cat(downs, dim=0), up)


def read_lora(path: str | Path, model: nn.Module) -> dict[str, LowRank]:
    """A LoRA file as {our linear path: LowRank} for `model` (float32, on the CPU). Raises
    CheckpointError naming the first offending tensor; returns only when every tensor was understood."""
    file = Path(path)
    if not file.is_file():
        raise not_found(file, "LoRA file")
    source = SafetensorsCheckpoint.open(file)
    shapes = linear_shapes(model)
    targets = lora_targets(shapes)
    modules = _group(file, source, targets)
    meta = _metadata_alpha(source.metadata)
    chosen: dict[tuple[str, int | None], tuple[Target, str]] = {}
    for module in modules:
        target = targets[module]
        slot = (target.path, target.part)
        if slot not in chosen or (target.diffusers_named and not chosen[slot][0].diffusers_named):
            chosen[slot] = (target, module)
    split = {path for path, part in chosen if part is not None}
    whole: dict[str, LowRank] = {}
    parts: dict[str, dict[int, LowRank]] = {}
    for (path, part), (_, module) in chosen.items():
        out_features, in_features = shapes[path]
        if part is None and path not in split:  # a fused qkv next to split q/k/v is redundant (diffusers)
            whole[path] = _pair(file, source, module, modules[module], (out_features, in_features), meta)
        elif part is not None:
            shape = (out_features // 3, in_features)
            parts.setdefault(path, {})[part] = _pair(file, source, module, modules[module], shape, meta)
    for path, by_part in parts.items():
        whole[path] = _block_diagonal(by_part, shapes[path][0])
    return whole
