"""Multistep consistency sampling (Song et al., ICML 2023, "Consistency Models", Algorithm 1).

A consistency model ``f(x, sigma)`` maps a noisy sample at any noise level straight to the clean
sample. One step: ``x0 = f(sigma_max * z, sigma_max)``. Each further step re-noises the current
estimate to a smaller level ``tau`` and denoises again, ``x = x0 + sqrt(tau^2 - sigma_min^2) * z``,
``x0 = f(x, tau)``, trading a forward per step for quality. The levels follow the Karras et al.
(2022) schedule, ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
with rho = 7, taking its first ``steps`` points (the last, sigma_min, would add no noise).

Everything is plain numpy so the same loop drives an ONNX Runtime session or a torch module
wrapped as ``denoise(x, sigma, cond) -> x0``. All noise for a sample is drawn up front from its
seed, so two denoisers compared on the same seeds see the same noise at every step.
"""
from __future__ import annotations

import numpy as np

from ...errors import LeanfmError


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """``n`` levels from ``sigma_max`` down to ``sigma_min`` (Karras et al., 2022, eq. 5)."""
    if n < 1:
        raise LeanfmError(f"a noise schedule needs at least 1 level (got {n})")
    if n == 1:
        return np.array([sigma_max])
    i = np.arange(n) / (n - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def step_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The noise level of each of ``steps`` consistency steps: sigma_max first, then the Karras
    schedule's next points (a schedule of ``steps + 1`` levels without its final sigma_min)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LeanfmError(f"the number of sampling steps must be a whole number >= 1 (got {steps!r})")
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:steps]


def draw_noise(seeds: list[int], steps: int, shape: tuple[int, ...]) -> np.ndarray:
    """``[steps, len(seeds), *shape]`` standard normal noise, sample j from ``seeds[j]`` alone."""
    out = np.empty((steps, len(seeds), *shape), dtype=np.float32)
    for j, s in enumerate(seeds):
        out[:, j] = np.random.default_rng(s).standard_normal((steps, *shape), dtype=np.float32)
    return out


def consistency_sample(denoise, noise: np.ndarray, cond: np.ndarray, sigmas: np.ndarray, sigma_min: float) -> np.ndarray:
    """Algorithm 1 of Song et al. (2023): ``noise [steps, B, ...]`` (one slice per step), ``sigmas``
    the step levels (:func:`step_sigmas`); returns the final clean estimate ``[B, ...]``."""
    if len(sigmas) != noise.shape[0]:
        raise LeanfmError(f"{len(sigmas)} noise levels for {noise.shape[0]} steps of noise")
    b = noise.shape[1]
    x0 = None
    for i, sigma in enumerate(sigmas):
        scale = sigma if i == 0 else np.sqrt(max(sigma * sigma - sigma_min * sigma_min, 0.0))
        x = noise[i] * scale if i == 0 else x0 + noise[i] * scale
        x0 = denoise(x.astype(np.float32), np.full(b, sigma, dtype=np.float32), cond)
    return x0
