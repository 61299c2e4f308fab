"""Random-weight Z-Image checkpoints of the real architecture, written in the diffusers folder layout.

`tiny` is for tests and the demo (seconds on a CPU); `full` has the real shapes (6B transformer, Qwen3-4B
encoder) for GPU benchmarks without a download. Every parameter gets a random, non-degenerate value
(norm weights around 1, biases and pad tokens nonzero, adaLN gates nonzero) so no bug hides behind a
zero-initialised layer. The tokenizer is a small byte-level BPE with the Qwen special tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_lite.config import DiTConfig, Qwen3Config, VAEConfig
from zimage_lite.published import published_config
from zimage_lite.weights.load import build_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSpec:
    dit: DiTConfig
    text: Qwen3Config
    vae: VAEConfig
    vocab_size: int


def _published_dit(**sizes) -> DiTConfig:
    """The published transformer config with only its sizes changed (rope_theta, t_scale, norm_eps,
    patch sizes and position-table lengths stay the real model's)."""
    return dataclasses.replace(DiTConfig.from_dict(published_config("transformer")), **sizes)


def _tiny() -> SyntheticSpec:
    text = Qwen3Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip
    dit = _published_dit(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=(8, 12, 12),
    )
    # norm groups stay 32 (as FLUX) so a config-less single file infers the same VAE
    vae = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    return SyntheticSpec(dit, text, vae, vocab_size=512)


def _small() -> SyntheticSpec:
    """Rows long enough (256-multiples) for the K-quants to apply to most linears, still CPU-fast."""
    text = Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=1024,
    )  # fmt: skip
    dit = _published_dit(dim=384, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=256)
    vae = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    return SyntheticSpec(dit, text, vae, vocab_size=512)


def _small_k() -> SyntheticSpec:
    """As small with dim 512, so the K-quants apply to every linear of the transformer but the FFN's w2,
    whose rows of ffn_dim 1365 fit no block and stay BF16 (small: dim 384 sends most to Q4_0/Q8_0)."""
    dit = DiTConfig(dim=512, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=256)
    return dataclasses.replace(_small(), dit=dit)


def _full() -> SyntheticSpec:
    return SyntheticSpec(_published_dit(), Qwen3Config(), VAEConfig(), vocab_size=151936)


SIZES: dict[str, Callable[[], SyntheticSpec]] = {
    "tiny": _tiny,
    "small": _small,
    "small-k": _small_k,
    "full": _full,
}

# Outlier channels (`outliers=True`): trained transformers carry a few input channels with activations
# an order of magnitude above the rest (the same channels in every layer), which is what an importance
# matrix is for; plain random weights hide that. The pre-linear norms' weights of 1/64 of the channels,
# the same ones in every layer, are multiplied by OUTLIER_GAIN.
OUTLIER_NORMS = re.compile(r"(attention_norm1|ffn_norm1|input_layernorm|post_attention_layernorm)\.weight$")
OUTLIER_GAIN = 16.0
OUTLIER_SEED = 1234


def _with_outliers(name: str, t: torch.Tensor) -> torch.Tensor:
    if not OUTLIER_NORMS.search(name):
        return t
    n = t.shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(OUTLIER_SEED))[: max(1, n // 64)]
    t = t.clone()
    t[idx.to(t.device)] *= OUTLIER_GAIN
    return t


def _chain(first, second):
    """The value edit that applies `first` (if any), then `second` (see _random_state)."""
    if first is None:
        return second
    return lambda name, t: second(name, first(name, t))


def _chain(first, second):
    """The value edit that applies `first` (if any), then `second` (see _random_state)."""
    if first is None:
        return second
    return lambda name, t: second(name, first(name, t))


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """A plausible random value for a parameter, chosen by its role (name) and shape."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or leaf == "weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=gen.device)  # norm scales around 1
    elif leaf == "bias" or "pad_token" in name:
        t = 0.05 * torch.randn(shape, generator=gen, device=gen.device)
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        t = torch.randn(shape, generator=gen, device=gen.device) / math.sqrt(fan_in)
    return t.to(dtype)


def _random_state(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, device: str = "cpu", edit=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Values drawn on `device` (a GPU draws the full model's 10 B values in seconds, the CPU in many
    minutes; the same seed gives other values there), returned in host memory. `edit(name, float32
    tensor)` may change a value before its cast (synthetic_stress.py)."""
    gen = torch.Generator(device).manual_seed(seed)
    for name in sorted(shapes):
        t = random_tensor(name, shapes[name], gen, torch.float32 if edit else dtype)
        yield name, (edit(name, t).to(dtype) if edit else t).cpu()


def _meta_shapes(factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_meta(factory).state_dict().items()}


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' save_file, its I/O failures as OSError (with errno and file name, as a write of ours
    would raise): a full disk then ends with the CLI's disk-full line, not a SafetensorError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file as save

    try:
        save(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)|code: (\d+)", str(exc))  # "I/O error: ... (os error 28)"
        if found is None:
            raise
        code = int(found[1] or found[2])
        raise OSError(code, os.strerror(code), str(path)) from exc


def _write_sharded(
    folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], stem: str, shard_bytes: int
) -> None:
    """Write safetensors shards of at most ~shard_bytes plus an index json (the diffusers layout). Each
    shard is written as soon as it is full, so one shard is in memory at a time (the full model's
    transformer alone is 24 GB in float32); the `-of-N` names are given once N is known."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        written.append(folder / f"{stem}-{len(written) + 1:05d}.part")
        save_file(shard, written[-1])
        weight_map.update(dict.fromkeys(shard, len(written)))
        shard.clear()

    for name, t in tensors:
        if shard and size + t.numel() * t.element_size() > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    flush()
    names = [f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for path, name in zip(written, names):
        path.rename(folder / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: names[i - 1] for k, i in weight_map.items()},
    }
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _write_json(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))


def write_transformer(
    folder: Path,
    cfg: DiTConfig,
    seed: int,
    dtype: torch.dtype,
    shard_bytes: int,
    device: str = "cpu",
    edit=None,
) -> None:
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.weights.names_dit import dit_to_diffusers

    shapes = _meta_shapes(lambda: ZImageDiT(cfg))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in _random_state(shapes, seed, dtype, device, edit):
            yield from dit_to_diffusers({name: t}).items()

    _write_sharded(folder, tensors(), "diffusion_pytorch_model", shard_bytes)
    _write_json(folder / "config.json", {"_class_name": "ZImageTransformer2DModel", **cfg.to_dict()})


def write_text_encoder(
    folder: Path,
    cfg: Qwen3Config,
    seed: int,
    dtype: torch.dtype,
    shard_bytes: int,
    device: str = "cpu",
    edit=None,
) -> None:
    from zimage_lite.models.qwen3 import Qwen3Encoder

    # A real checkpoint has every layer and the final norm, although we never use the last two.
    full = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1)
    shapes = _meta_shapes(lambda: Qwen3Encoder(full))
    shapes["norm.weight"] = (cfg.hidden_size,)
    _write_sharded(folder, _random_state(shapes, seed, dtype, device, edit), "model", shard_bytes)
    values = cfg.to_dict()
    values.update(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", attention_bias=False,
        tie_word_embeddings=True, torch_dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    _write_json(folder / "config.json", values)


def write_vae(folder: Path, cfg: VAEConfig, seed: int, dtype: torch.dtype, device: str = "cpu") -> None:
    from zimage_lite.models.vae import VAE

    shapes = _meta_shapes(lambda: VAE(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(_random_state(shapes, seed, dtype, device))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    n = len(cfg.block_out_channels)
    values = cfg.to_dict()
    values.update(
        _class_name="AutoencoderKL", act_fn="silu", sample_size=1024, force_upcast=True,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
    )  # fmt: skip
    _write_json(folder / "config.json", values)


def _component_shapes(spec: SyntheticSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.models.vae import VAE

    full_text = dataclasses.replace(spec.text, num_hidden_layers=spec.text.num_hidden_layers + 1)
    text = _meta_shapes(lambda: Qwen3Encoder(full_text))
    text["norm.weight"] = (spec.text.hidden_size,)
    return {
        "transformer": _meta_shapes(lambda: ZImageDiT(spec.dit)),
        "text_encoder": text,
        "vae": _meta_shapes(lambda: VAE(spec.vae)),
    }


def planned_bytes(size: str, dtype: torch.dtype, shard_bytes: int = 2 << 30) -> tuple[int, int]:
    """(bytes the model's files take, host bytes the writing holds at its peak: one shard, plus the
    largest tensor drawn in float32 and cast) for `write_synthetic_model`, from the shapes alone."""
    spec = SIZES[size]()
    disk, largest = 0, 0
    for component, shapes in _component_shapes(spec).items():
        item = (torch.bfloat16 if component == "text_encoder" and size == "full" else dtype).itemsize
        numels = [math.prod(s) for s in shapes.values()]
        disk += sum(numels) * item
        largest = max(largest, max(numels))
    vae = sum(math.prod(s) for s in _component_shapes(spec)["vae"].values()) * dtype.itemsize
    return disk, max(shard_bytes, vae) + largest * (4 + dtype.itemsize)


def write_synthetic_model(
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 2 << 30,
    device: str = "cpu",
    variant: str = "turbo",
    outliers: bool = False,
    stress: str | None = None,
) -> Path:
    """Write a complete diffusers-layout Z-Image folder with random weights; returns its path.
    `device`: where the values are drawn (see _random_state); `variant` ("turbo", "base"): whose
    published scheduler config it gets (the weights are the same kind of random either way);
    `outliers`: outlier input channels (OUTLIER_NORMS); `stress` "fp16": a few weights scaled so
    activations outgrow float16 as Z-Image's do (synthetic_stress.py)."""
    from zimage_lite.synthetic_stress import stress_edits
    from zimage_lite.synthetic_tokenizer import write_synthetic_tokenizer
    from zimage_lite.variants import VARIANTS, check_variant

    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose from {', '.join(SIZES)}")
    spec = SIZES[size]()
    dit_edit, text_edit = stress_edits(stress)
    out = Path(out)
    log.info("writing synthetic %s model to %s%s", size, out, f" (stress {stress})" if stress else "")
    if outliers:
        dit_edit, text_edit = _chain(dit_edit, _with_outliers), _chain(text_edit, _with_outliers)
    write_transformer(out / "transformer", spec.dit, seed + 1, dtype, shard_bytes, device, dit_edit)
    te_dtype = torch.bfloat16 if size == "full" else dtype
    write_text_encoder(out / "text_encoder", spec.text, seed + 2, te_dtype, shard_bytes, device, text_edit)
    write_vae(out / "vae", spec.vae, seed + 3, dtype, device)
    write_synthetic_tokenizer(out / "tokenizer", vocab_size=spec.vocab_size)
    sched = published_config("scheduler")  # Turbo's, unchanged; base: its published shift (variants.py)
    if check_variant(variant) != "turbo":
        sched = {**sched, "shift": VARIANTS[variant].shift}
    _write_json(out / "scheduler" / "scheduler_config.json", sched)
    _write_json(out / "model_index.json", MODEL_INDEX)
    return out


MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_synthetic_controlnet(
    path: str | Path, dit: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A random-weight 2.1-style Fun-Controlnet-Union branch for `dit`, in our layout (one safetensors
    file, places in its metadata): control blocks before every second main layer (the real 2.1's
    places on the real model), refiner-stage hints after the first two noise-refiner layers."""
    import json

    from zimage_lite.config import ControlNetConfig
    from zimage_lite.models.controlnet import ZImageControlNet
    from zimage_lite.weights.names_controlnet import CONTROLNET_KEY

    refiner = tuple(range(min(2, dit.n_refiner_layers)))
    cfg = ControlNetConfig(
        "2.1", dit.dim, dit.n_heads, 33, tuple(range(0, dit.n_layers, 2)), refiner, len(refiner)
    )
    shapes = _meta_shapes(lambda: ZImageControlNet(cfg))
    meta = {CONTROLNET_KEY: json.dumps({"version": cfg.version, "places": cfg.places,
                                        "refiner_places": cfg.refiner_places})}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(_random_state(shapes, seed, dtype)), str(path), metadata=meta)
    return path
