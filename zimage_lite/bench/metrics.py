"""Image and latent quality against a reference: PSNR, SSIM, latent relative error (numpy, float64).

SSIM follows Wang et al. 2004 with the Gaussian window that scikit-image uses under
`structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255, channel_axis=-1)`: an 11-tap window (radius int(3.5 * sigma + 0.5) = 5), local statistics
by separable filtering, the mean SSIM over the pixels whose whole window lies inside the image, then the
mean over channels. We filter only over those "valid" pixels, so no border mode is involved.
"""

from __future__ import annotations

import math

import numpy as np

K1, K2 = 0.01, 0.03
SIGMA, TRUNCATE = 1.5, 3.5


def _as_float_image(img) -> np.ndarray:
    """(H, W, C) float64 from a PIL image or an array (a 2-D array becomes one channel)."""
    arr = np.asarray(img, dtype=np.float64)
    return arr[..., None] if arr.ndim == 2 else arr


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def psnr(image, reference, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; math.inf when the images are identical."""
    a, b = _as_float_image(image), _as_float_image(reference)
    _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_kernel(sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) as scipy.ndimage uses."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filter over axes 0 and 1 keeping only full windows: (H, W, C) -> (H-k+1, W-k+1, C)."""
    k = len(taps)
    h, w = x.shape[0] - k + 1, x.shape[1] - k + 1
    rows = sum(t * x[i : i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, j : j + w] for j, t in enumerate(taps))


def ssim(image, reference, data_range: float = 255.0, sigma: float = SIGMA) -> float:
    """Mean structural similarity (1.0 when identical), Gaussian-weighted, averaged over channels."""
    a, b = _as_float_image(image), _as_float_image(reference)
    _check_pair(a, b)
    taps = gaussian_kernel(sigma)
    if min(a.shape[:2]) < len(taps):
        raise ValueError(f"images must be at least {len(taps)}x{len(taps)} for SSIM (got {a.shape[:2]})")
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    # population (not sample) covariances, as use_sample_covariance=False
    var_a = _filter_valid(a * a, taps) - mu_a * mu_a
    var_b = _filter_valid(b * b, taps) - mu_b * mu_b
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den, axis=(0, 1)).mean())


def latent_relative_error(latents, reference) -> float:
    """||x - ref|| / ||ref|| (Frobenius, float64); 0.0 when identical, inf for a zero reference."""
    x = np.asarray(_to_numpy(latents), dtype=np.float64)
    r = np.asarray(_to_numpy(reference), dtype=np.float64)
    _check_pair(x, r)
    diff = float(np.linalg.norm(x - r))
    if diff == 0.0:
        return 0.0
    norm = float(np.linalg.norm(r))
    return math.inf if norm == 0.0 else diff / norm


def _to_numpy(x):
    """Torch tensors (any device or dtype) to numpy without importing torch here."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
