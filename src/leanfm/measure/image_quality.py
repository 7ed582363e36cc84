"""Fidelity of generated images to a reference generated from the same seeds and conditions:
PSNR, SSIM and a distance between the two sets' value distributions (issue 19, diffusion)."""
from __future__ import annotations

import numpy as np


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)`` over all values (inf when equal)."""
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filtering of ``[..., H, W]``."""
    k = len(g)
    h = sum(g[i] * img[..., i:img.shape[-2] - k + 1 + i, :] for i in range(k))
    return sum(g[i] * h[..., :, i:h.shape[-1] - k + 1 + i] for i in range(k))


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Mean SSIM (Wang et al., 2004) of ``[..., H, W]`` images: an 11x11 Gaussian window of
    sigma 1.5, K1 = 0.01, K2 = 0.03, valid positions only; averaged over all images."""
    a, b = x.astype(np.float64), ref.astype(np.float64)
    g = _gauss()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    va = _filter(a * a, g) - mu_a ** 2
    vb = _filter(b * b, g) - mu_b ** 2
    cov = _filter(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


def value_w1(x: np.ndarray, ref: np.ndarray) -> float:
    """Wasserstein-1 distance between the two sets' value distributions (all pixels pooled):
    the mean absolute difference of their sorted values (equal counts)."""
    a, b = np.sort(x.ravel().astype(np.float64)), np.sort(ref.ravel().astype(np.float64))
    if a.shape != b.shape:
        raise ValueError("value_w1 compares sets of equal size")
    return float(np.mean(np.abs(a - b)))
