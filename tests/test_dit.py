"""Transformer parity against diffusers' ZImageTransformer2DModel on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from zimage_lite.config import DiTConfig
from zimage_lite.errors import CheckpointError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.synthetic import random_tensor
from zimage_lite.weights.load import build_meta, load_strict
from zimage_lite.weights.names_dit import dit_key_plan, dit_to_diffusers, load_dit_tensors


class DictSource(dict):
    def get(self, key):  # the TensorSource protocol used by the key plan
        return self[key]


def make_pair(cfg: DiTConfig, dtype=torch.float32, seed=0):
    """A diffusers model with random non-degenerate weights and our model loaded from its state dict."""
    ref = ZImageTransformer2DModel(**cfg.to_dict())
    gen = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(k, tuple(v.shape), gen, torch.float32) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ref = ref.to(dtype).eval()
    src = DictSource(ref.state_dict())
    plan = dit_key_plan(src.keys())
    ours = build_meta(lambda: ZImageDiT(cfg))
    load_strict(ours, {n: load_dit_tensors(src, plan, n) for n in plan}, "transformer", dtype=dtype)
    return ref, ours.eval()


def run_ref(ref, latents, t, caps):
    out = ref([x.unsqueeze(1) for x in latents.to(ref.dtype)], t, caps, return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CFGS = {
    "one_refiner": DiTConfig(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=(8, 12, 12),
    ),
    "two_refiners": DiTConfig(
        dim=96,
        n_layers=3,
        n_refiner_layers=2,
        n_heads=3,
        n_kv_heads=3,
        cap_feat_dim=48,
        axes_dims=(8, 12, 12),
        in_channels=4,
    ),
}


@pytest.mark.parametrize("cfg_name", list(CFGS))
@pytest.mark.parametrize(
    "hw,cap_lens",
    [((8, 8), [32]), ((6, 10), [7]), ((10, 6), [45, 45]), ((8, 12), [5, 40]), ((4, 4), [64, 3])],
)
def test_forward_matches_diffusers_fp32(cfg_name, hw, cap_lens):
    cfg = CFGS[cfg_name]
    ref, ours = make_pair(cfg)
    b = len(cap_lens)
    latents = torch.randn(b, cfg.in_channels, *hw)
    t = torch.rand(b)
    caps = [torch.randn(n, cfg.cap_feat_dim) for n in cap_lens]
    with torch.no_grad():
        expected = run_ref(ref, latents, t, caps)
        got = ours(latents, t, caps)
    assert got.shape == latents.shape
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("cap_lens", [[5, 40], [45, 45], [64, 3, 17]])
def test_blocks_in_chunks_match_diffusers(cap_lens):
    """chunks=2 (each block runs the batch in parts, as CFG's two passes do): the masked batch splits
    into parts with and without padding, an unmasked one into parts without a mask."""
    cfg = CFGS["one_refiner"]
    ref, ours = make_pair(cfg)
    g = torch.Generator().manual_seed(len(cap_lens))
    latents, t = (
        torch.randn(len(cap_lens), cfg.in_channels, 8, 6, generator=g),
        torch.rand(len(cap_lens), generator=g),
    )
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in cap_lens]
    with torch.no_grad():
        assert rel_err(ours(latents, t, caps, chunks=2), run_ref(ref, latents, t, caps)) <= 1e-5


@pytest.mark.parametrize("cfg_name", list(CFGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_diffusers_bf16(cfg_name, seed):
    """Both sides round to bf16 at the same places with the same torch ops, so the difference is only
    accumulation order. Measured (CPU, torch 2.13, 4 seeds x both configs): 0.0 relative every time.
    Computing RMSNorm statistics in bf16 instead of fp32 (a real bug class) measured 0.0082-0.0138.
    Tolerance 2e-3: 4x under the smallest bug, room for a matmul/SDPA order that differs on one side."""
    cfg = CFGS[cfg_name]
    ref, ours = make_pair(cfg, dtype=torch.bfloat16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    latents, t = torch.randn(2, cfg.in_channels, 8, 6, generator=g), torch.rand(2, generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g).bfloat16() for n in (9, 40)]
    with torch.no_grad():
        err = rel_err(ours(latents, t, caps), run_ref(ref, latents, t, caps))
    assert err <= 2e-3


def test_diffusers_and_comfy_names_give_identical_output():
    cfg = CFGS["one_refiner"]
    ref, ours = make_pair(cfg)
    comfy = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    comfy["norm_final.weight"] = torch.ones(cfg.dim)  # stray key found in ComfyUI files
    src = DictSource(comfy)
    plan = dit_key_plan(src.keys())
    again = load_strict(
        build_meta(lambda: ZImageDiT(cfg)), {n: load_dit_tensors(src, plan, n) for n in plan}, "t"
    )
    latents, t, caps = torch.randn(1, 16, 6, 6), torch.rand(1), [torch.randn(11, 32)]
    with torch.no_grad():
        assert torch.equal(again(latents, t, caps), ours(latents, t, caps))


def test_name_maps_round_trip():
    cfg = CFGS["two_refiners"]
    ours = build_meta(lambda: ZImageDiT(cfg)).state_dict()
    diff = dit_to_diffusers(ours)
    ref_keys = set(ZImageTransformer2DModel(**cfg.to_dict()).state_dict())
    assert set(diff) == ref_keys
    assert set(dit_key_plan(diff)) == set(ours)


def test_missing_and_unexpected_tensors_are_named():
    cfg = CFGS["one_refiner"]
    ours = build_meta(lambda: ZImageDiT(cfg))
    state = {k: torch.zeros(v.shape) for k, v in ours.state_dict().items()}
    del state["layers.1.feed_forward.w2.weight"]
    state["layers.9.bogus.weight"] = torch.zeros(3)
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors: layers\.1\.feed_forward\.w2\.weight.*unexpected tensors: layers\.9\.bogus\.weight",
    ):
        load_strict(build_meta(lambda: ZImageDiT(cfg)), state, "transformer")
    state = {k: torch.zeros(v.shape) for k, v in ours.state_dict().items()}
    state["x_pad_token"] = torch.zeros(1, 65)
    with pytest.raises(CheckpointError, match=r"wrong shapes: x_pad_token \(1, 65\) \(expected \(1, 64\)\)"):
        load_strict(build_meta(lambda: ZImageDiT(cfg)), state, "transformer")


@pytest.mark.parametrize("cfg_name", list(CFGS))
def test_config_inferred_from_our_shapes_is_the_config(cfg_name):
    """Sizes come back from our own model's shapes (the real shapes against the published config:
    test_published_configs.py)."""
    cfg = CFGS[cfg_name]
    shapes = {k: tuple(v.shape) for k, v in build_meta(lambda: ZImageDiT(cfg)).state_dict().items()}
    assert DiTConfig.from_shapes(shapes) == cfg


def test_two_layouts_of_one_tensor_are_refused():
    keys = ["layers.0.attention.out.weight", "layers.0.attention.to_out.0.weight", "x_pad_token"]
    with pytest.raises(CheckpointError, match="are both layers.0.attention.out.weight"):
        dit_key_plan(keys)


def test_rope_table_equals_diffusers_over_the_published_position_range():
    """The real model's axes (32, 48, 48) and theta over every position its tables hold (1536, 512, 512):
    equal bit for bit. Small test images reach positions of a few dozen only, where angles formed in
    float32 instead of float64 still agree; at position 1500 they do not."""
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    from zimage_lite.models.dit_sequence import rope_freqs
    from zimage_lite.published import published_config

    cfg = published_config("transformer")
    n = cfg["axes_lens"][0]
    ids = torch.stack([torch.arange(n), torch.arange(n) % 512, (torch.arange(n) * 7) % 512], dim=-1)
    theirs = RopeEmbedder(cfg["rope_theta"], cfg["axes_dims"], cfg["axes_lens"])(ids)
    ours = rope_freqs(ids, tuple(cfg["axes_dims"]), cfg["rope_theta"])
    assert ours.dtype == theirs.dtype == torch.complex64
    assert torch.equal(ours, theirs)
