"""The models run wholly on their weights' device: the DiT (with and without a ControlNet, in one pass or
in chunks), the Qwen3 text encoder and the VAE, in every compute dtype, built and run on the meta device
(tests/meta_device.py: a tensor made without `device=` fails there as it would on a GPU). On the way, the
residual streams are checked to be float32 where the weights are float16 (numerics.py: float16 that cannot
overflow) and the weights' dtype otherwise.

Mutation testing (tools/mutate.py, slice "models") found positions, masks and frequency tables whose
`device=` no test needed. The forward runs outside any `torch.device` context: inside one, a factory
without `device=` would land on the meta device and pass."""

from __future__ import annotations

import pytest
import torch

from tests.meta_device import META, MetaScalars
from zimage_lite.config import ControlNetConfig
from zimage_lite.control import ControlInput
from zimage_lite.models.controlnet import ZImageControlNet
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.numerics import wide_dtype
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.models.vae import VAE
from zimage_lite.synthetic import SIZES
from zimage_lite.weights.load import build_meta

SPEC = SIZES["tiny"]()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # float16 takes the scaled paths (numerics.py)


def on_meta(factory, dtype: torch.dtype) -> torch.nn.Module:
    return build_meta(factory).to(dtype).eval()


def stream_dtypes(blocks) -> list[torch.dtype]:
    """Records the dtype of what enters and leaves each of `blocks` (the residual stream)."""
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, out: seen.extend([args[0].dtype, out.dtype]))
    return seen


def controlnet(version: str) -> ZImageControlNet:
    two = version != "v1"
    cfg = ControlNetConfig(
        version=version, dim=SPEC.dit.dim, n_heads=SPEC.dit.n_heads, control_in_dim=33 if two else 16,
        places=(0, 1), refiner_places=(0,) if two else (), n_refiner_blocks=1 if version != "2.0" else 0,
    )  # fmt: skip
    return build_meta(lambda: ZImageControlNet(cfg))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("control", [None, "v1", "2.0", "2.1"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_dit_stays_on_its_device(dtype, control, chunks):
    dit = on_meta(lambda: ZImageDiT(SPEC.dit), dtype)
    latents = torch.empty(2, SPEC.dit.in_channels, 8, 6, device=META)
    captions = [torch.empty(n, SPEC.dit.cap_feat_dim, device=META) for n in (5, 40)]  # masked: pads to 32, 64
    hook = None
    if control is not None:
        net = controlnet(control).to(dtype)
        hook = ControlInput(net, torch.empty(1, net.config.control_in_dim, 8, 6, device=META), 0.75)
    streams = stream_dtypes([*dit.noise_refiner, *dit.context_refiner, *dit.layers])
    with torch.no_grad(), MetaScalars():
        out = dit(latents, torch.empty(2, device=META), captions, chunks=chunks, control=hook)
    assert (out.device, out.dtype, tuple(out.shape)) == (META, dtype, tuple(latents.shape))
    assert set(streams) == {wide_dtype(dtype)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_text_encoder_stays_on_its_device(dtype, masked):
    enc = on_meta(lambda: Qwen3Encoder(SPEC.text), dtype)
    ids = torch.empty(2, 7, dtype=torch.long, device=META)
    mask = torch.empty(2, 7, dtype=torch.bool, device=META) if masked else None
    streams = stream_dtypes(enc.layers)
    with torch.no_grad(), MetaScalars():
        out = enc(ids, mask)
    assert (out.device, out.dtype, tuple(out.shape)) == (
        META,
        wide_dtype(dtype),
        (2, 7, SPEC.text.hidden_size),
    )
    assert set(streams) == {wide_dtype(dtype)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_vae_stays_on_its_device(dtype):
    vae = on_meta(lambda: VAE(SPEC.vae), dtype)
    streams = stream_dtypes([vae.encoder.mid_block, vae.decoder.mid_block])
    with torch.no_grad(), MetaScalars():
        moments = vae.encode(torch.empty(1, 3, 32, 32, device=META))
        image = vae.decode(torch.empty(1, SPEC.vae.latent_channels, 4, 4, device=META))
    assert (moments.device, moments.dtype) == (image.device, image.dtype) == (META, dtype)
    assert tuple(image.shape) == (1, 3, 32, 32)
    assert set(streams) == {wide_dtype(dtype)}
