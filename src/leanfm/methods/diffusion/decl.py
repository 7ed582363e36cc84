"""Declarations of the diffusion techniques (torch-free): fewer sampling steps, DeepCache, int8
weights in the ONNX graph. They apply to a ``diffusion`` model (``models/denoiser.py``)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sampler_steps(steps, default: int) -> int:
    """The denoising steps a recipe's ``steps`` sample with (``default``: the protocol's unless a
    step sets its own), after every step that depends on it has checked it (one-line errors)."""
    n = default
    for s in steps:
        if hasattr(s, "sampler_steps"):
            n = s.sampler_steps(n)
    for s in steps:
        if hasattr(s, "check_sampler"):
            s.check_sampler(n)
    return n


class _DenoiserEffect:
    """The LM predictor's effect of a diffusion step: not its to price (``leanfm predict`` on the
    denoiser applies the step to the graph and prices that, ``predict/unet.py``)."""

    def effect(self, eff) -> None:
        eff.unmodelled.append(f"{self.method}: the LM roofline does not price diffusion denoisers (leanfm predict --model "
                              "<denoiser> prices it per step)")


@dataclass
class SamplingStepsConfig(_DenoiserEffect, BaseConfig):
    """Sample with this many multistep consistency steps instead of the protocol's (Song et al., 2023,
    Algorithm 1): each step is one pass of the denoiser.

    steps: denoising steps per sample, >= 1 (1: one-step generation, the consistency model's
    cheapest; more steps re-noise and denoise again, trading time for fidelity).
    """

    method = "sampling-steps"
    families = ("diffusion",)
    handler = "leanfm.methods.diffusion.apply:apply_steps"
    produces = "sampling-schedule"

    steps: int = 1

    def validate(self) -> None:
        if not _whole(self.steps) or self.steps < 1:
            raise LeanfmError(f"sampling-steps steps={self.steps!r} must be a whole number >= 1 (denoising steps per sample)")

    def sampler_steps(self, steps: int) -> int:
        return self.steps


@dataclass
class DeepCacheConfig(_DenoiserEffect, BaseConfig):
    """DeepCache (Ma et al., CVPR 2024): run the whole UNet every ``interval`` steps and, in between,
    only its shallow full-resolution path fed the deep feature cached from the last full step.

    interval: steps per full pass, >= 2 (2: every other step reuses the cache). Needs a sampler
    of at least 2 steps to save anything; the cached feature is the input of the graph's last
    upsampling (Resize) node.
    """

    method = "deepcache"
    families = ("diffusion",)
    handler = "leanfm.methods.diffusion.apply:apply_deepcache"
    produces = "feature-cache"

    interval: int = 2

    def validate(self) -> None:
        if not _whole(self.interval) or self.interval < 2:
            raise LeanfmError(f"deepcache interval={self.interval!r} must be a whole number >= 2 (denoising steps per full "
                              "pass; 1 would never reuse the cache)")

    def check_sampler(self, steps: int) -> None:
        if steps < 2:
            raise LeanfmError(f"deepcache reuses features across steps, but it samples with {steps} step; use --steps 2 or "
                              "more (or a sampling-steps step of 2 or more)")


@dataclass
class OnnxInt8Config(_DenoiserEffect, BaseConfig):
    """int8 weights in the denoiser's ONNX graph: per-output-channel symmetric int8 codes.

    activations: false = weight-only (int8 storage behind DequantizeLinear, fp32 compute);
    true = ONNX Runtime's static QDQ quantization of the Conv/MatMul/Gemm nodes with uint8
    activations calibrated by min-max on ``calib_seeds`` noisy inputs at the sampler's noise
    levels (integer kernels; the elementwise preconditioning stays fp32).
    calib_seeds: calibration inputs per noise level (activations only).
    """

    method = "onnx-int8"
    families = ("diffusion",)
    handler = "leanfm.methods.diffusion.apply:apply_int8"
    produces = "int8-graph"

    activations: bool = False
    calib_seeds: int = 8

    def validate(self) -> None:
        if not isinstance(self.activations, bool):
            raise LeanfmError(f"onnx-int8 activations={self.activations!r} must be true or false")
        if not _whole(self.calib_seeds) or self.calib_seeds < 1:
            raise LeanfmError(f"onnx-int8 calib_seeds={self.calib_seeds!r} must be a whole number >= 1")
