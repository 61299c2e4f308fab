"""One frozen dataclass config per model: read from a config.json, or inferred from tensor shapes.

Every config validates itself on construction, so a bad value fails where it enters, with its name.
Field names follow the diffusers / transformers config.json keys so `from_json` is a plain filter.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage_lite.errors import ConfigError

Shapes = Mapping[str, tuple[int, ...]]
FIXED = {"fixed": True}  # field metadata: an architecture constant, not a config.json key


def _require(cond: bool, model: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid {model} config: {msg}")


class _FromJson:
    """Mixin: build from a config dict or config.json file, ignoring keys we do not model."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types, e.g. a string where an int belongs
            raise ConfigError(f"invalid {cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path):
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """The config.json values (architecture constants marked `FIXED` are left out)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.metadata.get("fixed")
        }


@dataclass(frozen=True)
class DiTConfig(_FromJson):
    """Z-Image S3-DiT transformer (diffusers `ZImageTransformer2DModel` config.json keys)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    in_channels: int = 16
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    # Fixed by the architecture (not in config.json): adaLN input width and timestep MLP width.
    adaln_embed_dim: int = field(default=256, repr=False, metadata=FIXED)
    t_mid_dim: int = field(default=1024, repr=False, metadata=FIXED)
    seq_multiple: int = field(default=32, repr=False, metadata=FIXED)

    def __post_init__(self) -> None:
        m = "transformer"
        _require(self.dim > 0 and self.n_heads > 0, m, "dim and n_heads must be positive")
        _require(self.dim % self.n_heads == 0, m, f"dim {self.dim} not divisible by n_heads {self.n_heads}")
        _require(self.n_kv_heads == self.n_heads, m, "n_kv_heads must equal n_heads (Z-Image has no GQA)")
        _require(sum(self.axes_dims) == self.head_dim, m, f"sum(axes_dims) {sum(self.axes_dims)} != head_dim")
        _require(all(d % 2 == 0 for d in self.axes_dims), m, "axes_dims must be even (complex RoPE pairs)")
        _require(len(self.axes_dims) == len(self.axes_lens) == 3, m, "axes_dims/axes_lens need 3 entries")
        _require(self.all_patch_size == (2,) and self.all_f_patch_size == (1,), m, "only patch 2, f_patch 1")
        _require(self.n_layers >= 1 and self.n_refiner_layers >= 0, m, "layer counts out of range")
        _require(self.in_channels > 0 and self.cap_feat_dim > 0, m, "channel counts must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, self.adaln_embed_dim)

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> DiTConfig:
        """Infer from our (original-named) tensor shapes: single files carry no config.json.

        head_dim comes from the q-norm weight; axes_dims keep the real model's proportions [1/4, 3/8, 3/8].
        """
        try:
            head_dim = shapes["layers.0.attention.q_norm.weight"][0]
            dim = shapes["x_pad_token"][-1]
            n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
            refiners = [int(k.split(".")[1]) for k in shapes if k.startswith("noise_refiner.")]
            cap_feat_dim = shapes["cap_embedder.1.weight"][1]
            in_channels = shapes["x_embedder.weight"][1] // 4
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"cannot infer transformer config from tensor shapes: missing {exc}") from None
        q = head_dim // 8
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_refiner_layers=1 + max(refiners) if refiners else 0,
            n_heads=dim // head_dim,
            n_kv_heads=dim // head_dim,
            cap_feat_dim=cap_feat_dim,
            in_channels=in_channels,
            axes_dims=(2 * q, 3 * q, 3 * q),
        )


@dataclass(frozen=True)
class Qwen3Config(_FromJson):
    """Qwen3 text encoder (transformers `Qwen3Config` keys). We build num_hidden_layers - 1 layers:
    the conditioning is hidden_states[-2], so the last layer, final norm and LM head are never used."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960

    def __post_init__(self) -> None:
        m = "text encoder"
        _require(self.num_hidden_layers >= 2, m, "need at least 2 layers (output is hidden_states[-2])")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0, m, "q heads not a multiple of kv heads"
        )
        _require(self.head_dim % 2 == 0 and self.hidden_size > 0 and self.vocab_size > 0, m, "bad sizes")

    @property
    def num_built_layers(self) -> int:
        return self.num_hidden_layers - 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Qwen3Config:
        values = dict(values)
        # transformers >= 5 moves rope_theta into rope_parameters
        rope = values.get("rope_parameters") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return super().from_dict(values)  # type: ignore[return-value]


@dataclass(frozen=True)
class VAEConfig(_FromJson):
    """FLUX autoencoder (diffusers `AutoencoderKL` config.json keys)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    def __post_init__(self) -> None:
        m = "VAE"
        _require(len(self.block_out_channels) >= 1, m, "block_out_channels is empty")
        _require(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels), m, "channels % groups != 0"
        )
        _require(not self.use_quant_conv and not self.use_post_quant_conv, m, "quant convs are not supported")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (8 for the FLUX VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig(_FromJson):
    """FlowMatchEulerDiscreteScheduler as Z-Image-Turbo configures it."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False

    def __post_init__(self) -> None:
        _require(not self.use_dynamic_shifting, "scheduler", "dynamic shifting is not used by Z-Image-Turbo")
        _require(
            self.shift > 0 and self.num_train_timesteps > 0, "scheduler", "shift and timesteps must be > 0"
        )


# Fun-Controlnet-Union versions (VideoX-Fun's config/z_image/*.yaml): control blocks, the main layer
# after which each block's hint is added (for the real 30-layer transformer), the noise-refiner layers
# that take refiner-stage hints, and the control input channels. "2.0" computes its refiner-stage hints
# with the main control blocks (`add_control_noise_refiner_correctly: false`).
CONTROLNET_VERSIONS: dict[str, dict[str, Any]] = {
    "v1": {"places": tuple(range(0, 30, 5)), "refiner_places": (), "in_dim": 16},
    "2.0": {"places": tuple(range(0, 30, 2)), "refiner_places": (0, 1), "in_dim": 33},
    "2.1": {"places": tuple(range(0, 30, 2)), "refiner_places": (0, 1), "in_dim": 33},
    "2.1-lite": {"places": (0, 10, 20), "refiner_places": (0, 1), "in_dim": 33},
}


@dataclass(frozen=True)
class ControlNetConfig:
    """A Fun-Controlnet-Union control branch. `places[i]`: the main layer after which control block i's
    hint is added; `refiner_places[j]`: the noise-refiner layer after which refiner-stage hint j is added
    (v1: none). `n_refiner_blocks`: v1's plain control refiner blocks, 2.1's control refiner blocks,
    0 for 2.0 (its refiner stage runs the main control blocks)."""

    version: str
    dim: int
    n_heads: int
    control_in_dim: int
    places: tuple[int, ...]
    refiner_places: tuple[int, ...]
    n_refiner_blocks: int
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        m = "ControlNet"
        _require(self.version in CONTROLNET_VERSIONS, m, f"unknown version {self.version!r}")
        _require(self.dim > 0 and self.n_heads > 0 and self.dim % self.n_heads == 0, m, "bad dim/n_heads")
        _require(len(self.places) >= 1 and self.places[0] == 0, m, "the first hint goes after main layer 0")
        _require(list(self.places) == sorted(set(self.places)), m, "places must increase")
        _require(self.control_in_dim > 0, m, "control_in_dim must be positive")
        two = self.version != "v1"
        _require(not two or len(self.refiner_places) >= 1, m, "2.x has refiner-stage hints")
        _require(two or not self.refiner_places, m, "v1 has no refiner-stage hints")
        _require(not self.refiner_places or self.refiner_places[0] == 0, m, "refiner hints start at layer 0")
        _require(
            list(self.refiner_places) == sorted(set(self.refiner_places)), m, "refiner places must increase"
        )
        stage = self.n_refiner_blocks if self.version != "2.0" else len(self.places)
        _require(not two or len(self.refiner_places) <= stage, m, "more refiner hints than refiner blocks")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def block_config(self) -> DiTConfig:
        """A DiTConfig that builds this branch's blocks (width, heads, eps; the rest unused)."""
        q = self.head_dim // 8
        return DiTConfig(
            dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_heads, norm_eps=self.norm_eps,
            axes_dims=(self.head_dim - 6 * q, 3 * q, 3 * q),
        )  # fmt: skip

    def check_fits(self, dit: DiTConfig) -> None:
        """Refuse (one line) a branch made for another transformer."""
        if dit.dim != self.dim or dit.n_heads != self.n_heads:
            raise ConfigError(
                f"this ControlNet is {self.dim} wide with {self.n_heads} heads; the transformer is "
                f"{dit.dim} wide with {dit.n_heads}"
            )
        if self.places[-1] >= dit.n_layers or any(p >= dit.n_refiner_layers for p in self.refiner_places):
            raise ConfigError(
                f"this ControlNet ({self.version}) adds hints after main layers {list(self.places)} and "
                f"refiner layers {list(self.refiner_places)}; the transformer has {dit.n_layers} layers and "
                f"{dit.n_refiner_layers} refiner layers"
            )
