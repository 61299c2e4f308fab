"""Load each model component from whatever layout it comes in, into a model built on the meta device.

One path for every format: `open_checkpoint` gives a source (safetensors, ComfyUI FP8 safetensors, GGUF)
with uniform `keys/shape/qtype/get/get_quant`; a component-specific *plan* maps our parameter names to
source keys; linears whose source tensors are quantized become `QuantLinear`s holding the raw bytes
(swapped in on the meta device before loading); everything else is materialised densely in `dtype`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zimage_lite.config import Qwen3Config
from zimage_lite.errors import CheckpointError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.weights.checkpoint import open_checkpoint
from zimage_lite.weights.load import build_meta, check_keys, load_strict
from zimage_lite.weights.names_dit import dit_config_for, dit_key_plan, dit_shapes, load_dit_tensors

log = logging.getLogger(__name__)

DENSE_QTYPES = frozenset({"F32", "F16", "BF16", "F64"})
Plan = Mapping[str, tuple[str, ...]]  # our name -> source keys (several: concatenate on dim 0)


def _quantized_linears(model: nn.Module, source, plan: Plan) -> dict[str, str]:
    """Module path -> qtype for every nn.Linear whose weight is stored quantized in the source."""
    modules = dict(model.named_modules())
    out = {}
    for name, keys in plan.items():
        path = name.removesuffix(".weight")
        if path == name or not isinstance(modules.get(path), nn.Linear):
            continue
        qtypes = {source.qtype(k) for k in keys}
        qtype = qtypes.pop() if len(qtypes) == 1 else None
        # FP8 parts carry one scale each, so a split q/k/v in FP8 cannot be fused raw: load it dense
        if qtype is not None and qtype not in DENSE_QTYPES and (len(keys) == 1 or qtype != "FP8_E4M3"):
            out[path] = qtype
    return out


def _quant_tensors(source, keys: tuple[str, ...], path: str, device) -> dict[str, torch.Tensor]:
    parts = [source.get_quant(k) for k in keys]
    data = parts[0].data if len(parts) == 1 else torch.cat([p.data for p in parts])  # rows are independent
    tensors = {f"{path}.weight": data.to(device)}
    scale = parts[0].scale
    if parts[0].qtype == "FP8_E4M3":
        scale = torch.ones(()) if scale is None else scale  # a plain cast has no scale
        if scale.numel() != 1:
            raise CheckpointError(f"{keys[0]}: per-channel FP8 scales are not supported")
        tensors[f"{path}.weight_scale"] = scale.reshape(()).float().to(device)
    return tensors


def materialize(
    model: nn.Module, source, plan: Plan, shapes: Mapping[str, tuple[int, ...]], what: str, dtype, device
) -> nn.Module:
    """Check names/shapes (before reading data), swap in QuantLinears, load strictly."""
    from zimage_lite.runtime.quant_linear import swap_linears

    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, what)
    qlinears = _quantized_linears(model, source, plan)
    swap_linears(model, qlinears, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, keys in plan.items():
        path = name.removesuffix(".weight")
        if name != path and path in qlinears:
            tensors.update(_quant_tensors(source, keys, path, device))
            continue
        t = load_dit_tensors(source, plan, name)
        tensors[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if qlinears:
        log.info(
            "%s: %d quantized linears (%s)", what, len(qlinears), ", ".join(sorted(set(qlinears.values())))
        )
    return load_strict(model, tensors, what)


def load_transformer(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> ZImageDiT:
    """diffusers folder, single safetensors (diffusers or ComfyUI names, FP8 variants) or GGUF."""
    path = Path(path)
    source = open_checkpoint(path)
    keys = source.keys()
    if not any(k.endswith(("x_pad_token", "cap_pad_token")) for k in keys):
        raise CheckpointError(f"{path}: not a Z-Image transformer (no x_pad_token/cap_pad_token tensors)")
    plan = dit_key_plan(keys)
    shapes = dit_shapes(source, plan)
    cfg = dit_config_for(path, shapes)
    model = build_meta(lambda: ZImageDiT(cfg))
    log.info("transformer: %s (dim %d, %d layers)", path, cfg.dim, cfg.n_layers)
    model = materialize(model, source, plan, shapes, f"{path}: transformer", dtype, device)
    if dtype == torch.float16:
        protect_fp16(model)
    return model


FP16_FLOAT32_OUTPUTS = ("feed_forward.w2", "attention.out")


def protect_fp16(model: nn.Module) -> None:
    """Z-Image's FFN and attention outputs exceed fp16's 65504 (stable-diffusion.cpp users get black
    images). Quantized layers feeding the sandwich norms return float32 (their GEMM accumulates in fp32
    and w2's input is pre-scaled by 1/128, see QuantLinear); the RMSNorm after them brings values back
    into range before the residual add."""
    from zimage_lite.runtime.quant_linear import QuantLinear

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name.endswith(FP16_FLOAT32_OUTPUTS):
            module.out_dtype = torch.float32


def _qwen3_plan(source, path: Path) -> tuple[dict[str, tuple[str, ...]], Qwen3Config]:
    """Our (HF, unprefixed) names -> source keys, and the config, for safetensors or llama.cpp GGUF."""
    from zimage_lite.models.qwen3 import infer_qwen3_config
    from zimage_lite.weights.gguf_qwen3 import qwen3_config_from_gguf
    from zimage_lite.weights.names_qwen3 import bare_names, is_unused_by_encoder

    by_name = bare_names(source)
    if source.format == "gguf":
        config = qwen3_config_from_gguf(source)
    else:
        cfg_file = path / "config.json" if path.is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            config = Qwen3Config.from_json(cfg_file)
        else:
            config = infer_qwen3_config({n: source.shape(k) for n, k in by_name.items()})
    # the last layer, final norm and LM head are legitimately unused (we stop at hidden_states[-2])
    plan = {n: (k,) for n, k in by_name.items() if not is_unused_by_encoder(n, config.num_hidden_layers)}
    return plan, config


def load_text_encoder(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """diffusers `text_encoder/` folder, ComfyUI `qwen_3_4b.safetensors`, or a llama.cpp qwen3 GGUF."""
    from zimage_lite.models.qwen3 import Qwen3Encoder

    path = Path(path)
    source = open_checkpoint(path)
    plan, config = _qwen3_plan(source, path)
    if not any(n.startswith("embed_tokens") for n in plan):
        raise CheckpointError(f"{path}: not a Qwen3 text encoder (no embedding table)")
    model = build_meta(lambda: Qwen3Encoder(config))
    shapes = {n: tuple(source.shape(k[0])) for n, k in plan.items()}
    log.info("text encoder: %s (%d of %d layers)", path, config.num_built_layers, config.num_hidden_layers)
    return materialize(model, source, plan, shapes, f"{path}: text encoder", dtype, device)


def load_tokenizer(path: str | Path):
    """tokenizer.json (file, `tokenizer/` folder or model root), or the tokenizer inside a GGUF."""
    from zimage_lite.text import PromptTokenizer
    from zimage_lite.weights.gguf import is_gguf_file

    path = Path(path)
    if path.is_file() and is_gguf_file(path):
        tok = open_checkpoint(path).tokenizer()
        if tok is None:
            raise CheckpointError(f"{path}: this GGUF carries no tokenizer; pass --tokenizer")
        return PromptTokenizer(tok)
    return PromptTokenizer.from_file(path)


def load_vae(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    from zimage_lite.weights.names_vae import load_vae as load_vae_safetensors

    return load_vae_safetensors(path, dtype, device)
