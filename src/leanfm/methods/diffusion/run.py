"""Running a :class:`~leanfm.models.denoiser.DenoiserModel` as its methods left it: the ONNX
Runtime sessions (one graph, or DeepCache's two halves) and the multistep consistency sampler."""
from __future__ import annotations

import numpy as np

from ...models.denoiser import DenoiserModel, OnnxGraphDenoiser
from .deepcache import CachedDenoiser, split
from .int8_onnx import fold_weight_dequantize
from .sampling import consistency_sample, draw_noise, step_sigmas


def denoiser(model: DenoiserModel, threads: int):
    """``denoise(x, sigma, cond) -> x0`` on CPU sessions of the model's current graph (int8
    weight-only graphs dequantized once, here, not on every call); with DeepCache
    (``model.cache_interval``) the full graph and its shallow half."""
    names = model.input_names()
    proto = fold_weight_dequantize(model.proto)
    if model.cache_interval is None:
        return OnnxGraphDenoiser(proto.SerializeToString(), threads, names)
    full, shallow, tensor = split(proto)
    return CachedDenoiser(OnnxGraphDenoiser(full.SerializeToString(), threads, names, extra=(tensor,)),
                          OnnxGraphDenoiser(shallow.SerializeToString(), threads, names), tensor, model.cache_interval)


def steps_of(model: DenoiserModel, default: int) -> int:
    return model.steps or default


def sample(model: DenoiserModel, seeds: list[int], steps: int, denoise) -> np.ndarray:
    """``[len(seeds), C, H, W]`` samples by multistep consistency sampling with the model's step
    count (else ``steps``); every sample's noise comes from its own seed and its condition is the
    seed's turn in ``config.conditions``. ``denoise``: from :func:`denoiser` (sessions reused)."""
    c = model.config
    n = steps_of(model, steps)
    if hasattr(denoise, "reset"):
        denoise.reset()
    noise = draw_noise(list(seeds), n, (c.channels, c.size, c.size))
    cond = np.array([c.conditions[s % len(c.conditions)] for s in seeds], np.float32)
    return consistency_sample(denoise, noise, cond, step_sigmas(n, c.sigma_min, c.sigma_max), c.sigma_min)
