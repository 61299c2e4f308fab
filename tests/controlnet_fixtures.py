"""Tiny random-weight Fun-Controlnet-Union models, built with diffusers' ZImageControlNetModel (the
reference class) and written as a diffusers folder or in alibaba-pai's single-file key layout.

Every tensor gets a plausible nonzero value (synthetic.random_tensor), the zero-initialised projections
included, so no path hides behind a zero. 2.0 files carry untrained (zero before_proj) refiner blocks
as alibaba-pai's do; diffusers cannot express them, so they are added to the single file by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImageControlNetModel
from safetensors.torch import save_file

from zimage_lite.synthetic import random_tensor

# version -> (diffusers add_control_noise_refiner, control_in_dim, places, refiner places) for the real
# 30-layer transformer (the single-file layout; its places come from the version table)
REAL = {
    "v1": (None, 16, list(range(0, 30, 5)), None),
    "2.0": ("control_layers", 33, list(range(0, 30, 2)), [0, 1]),
    "2.1": ("control_noise_refiner", 33, list(range(0, 30, 2)), [0, 1]),
    "2.1-lite": ("control_noise_refiner", 33, [0, 10, 20], [0, 1]),
}


def build(mode, in_dim, places, refiner, *, dim=64, heads=2, n_refiner=2, seed=0, zero_refiner_out=False):
    net = ZImageControlNetModel(
        control_layers_places=places, control_refiner_layers_places=refiner, control_in_dim=in_dim,
        add_control_noise_refiner=mode, dim=dim, n_refiner_layers=n_refiner, n_heads=heads, n_kv_heads=heads,
    )  # fmt: skip
    gen = torch.Generator("cpu").manual_seed(seed)
    state = {k: random_tensor(k, tuple(v.shape), gen, torch.float32) for k, v in net.state_dict().items()}
    if zero_refiner_out:  # 2.1 with refiner-stage hints of zero: diffusers and the authors agree
        state = {k: (torch.zeros_like(v) if ".after_proj." in k and "noise_refiner" in k else v)
                 for k, v in state.items()}  # fmt: skip
    net.load_state_dict(state)
    return net.eval()


def write_diffusers(folder: Path, net) -> Path:
    net.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_alibaba(path: Path, version: str, *, dim=64, heads=2, seed=0) -> Path:
    """A single file as alibaba-pai ships it (diffusers names, no config), real block counts."""
    mode, in_dim, places, refiner = REAL[version]
    state = build(mode, in_dim, places, refiner, dim=dim, heads=heads, seed=seed).state_dict()
    if version == "2.0":
        extra = build("control_noise_refiner", in_dim, [0], [0, 1], dim=dim, heads=heads, seed=seed + 1)
        for k, v in extra.state_dict().items():
            if k.startswith("control_noise_refiner."):
                state[k] = torch.zeros_like(v) if k.endswith("before_proj.weight") else v
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
