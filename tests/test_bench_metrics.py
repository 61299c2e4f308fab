"""Our PSNR / SSIM / latent error against scikit-image and numpy written independently of ours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from zimage_lite.bench.metrics import gaussian_kernel, latent_relative_error, psnr, ssim


def _pair(seed: int, shape=(48, 40, 3), noise: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish uint8 image and a noisy copy of it (clipped), like a quantized generation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 128 + 60 * np.sin(xx[..., None] / 5.0 + np.arange(shape[2])) * np.cos(yy[..., None] / 7.0)
    base = base + rng.normal(0, 10, shape)
    ref = np.clip(base, 0, 255).astype(np.uint8)
    out = np.clip(ref + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)
    return out, ref


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )


@pytest.mark.parametrize("seed,noise", [(0, 2.0), (1, 20.0), (2, 80.0)])
def test_psnr_matches_skimage(seed, noise):
    a, b = _pair(seed, noise=noise)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), rel=1e-12)


@pytest.mark.parametrize(
    "seed,noise,shape", [(0, 2.0, (48, 40, 3)), (1, 20.0, (33, 64, 3)), (2, 80.0, (16, 16, 3))]
)
def test_ssim_matches_skimage(seed, noise, shape):
    a, b = _pair(seed, shape=shape, noise=noise)
    ours, theirs = ssim(a, b), _skimage_ssim(a, b)
    assert ours == pytest.approx(theirs, abs=1e-9)  # float64 both sides; only summation order differs
    assert 0.0 < ours < 1.0


def test_ssim_accepts_pil_and_grayscale():
    from PIL import Image

    a, b = _pair(3, noise=10.0)
    assert ssim(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(_skimage_ssim(a, b), abs=1e-9)
    g1, g2 = a[..., 0], b[..., 0]
    theirs = structural_similarity(
        g1, g2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(g1, g2) == pytest.approx(theirs, abs=1e-9)


def test_identical_images_give_inf_and_one():
    a, _ = _pair(4)
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)


def test_kernel_is_scipys_11_tap_gaussian():
    from scipy.ndimage import gaussian_filter1d

    impulse = np.zeros(21)
    impulse[10] = 1.0
    theirs = gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16]
    np.testing.assert_allclose(gaussian_kernel(), theirs, rtol=0, atol=1e-15)


def test_latent_relative_error():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 8, 8, generator=gen)
    delta = 1e-2 * torch.randn(1, 16, 8, 8, generator=gen)
    expected = np.linalg.norm(delta.double().numpy()) / np.linalg.norm(ref.double().numpy())
    assert latent_relative_error(ref + delta, ref) == pytest.approx(expected, rel=1e-5)  # fp32 sum
    assert latent_relative_error(ref.clone(), ref) == 0.0
    assert latent_relative_error(ref.bfloat16(), ref.numpy()) > 0.0  # bf16 rounding is seen


def test_shape_mismatch_is_an_error():
    a, _ = _pair(5)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:-1])
    with pytest.raises(ValueError, match="at least"):
        ssim(a[:8, :8], a[:8, :8])
