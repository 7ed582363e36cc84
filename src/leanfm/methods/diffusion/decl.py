"""Declarations of the diffusion techniques (torch-free): fewer sampling steps, DeepCache, int8
weights in the ONNX graph, a DPM-Solver scheduler, ToMe in the UNet's attention. They apply to an
ONNX denoiser (family ``diffusion``, ``models/denoiser.py``) or a diffusers pipeline (family
``diffusion-pipeline``, ``models/pipeline.py``), as each declares."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ...space import Choice


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
    """Sample with this many denoising steps instead of the protocol's: on an ONNX consistency
    model, multistep consistency sampling (Song et al., 2023, Algorithm 1); on a diffusers
    pipeline, its scheduler's ``num_inference_steps``. Each step is one pass of the denoiser.

    steps: denoising steps per sample, >= 1 (1: one-step generation, the consistency model's
    cheapest; more steps re-noise and denoise again, trading time for fidelity).
    """

    method = "sampling-steps"
    families = ("diffusion", "diffusion-pipeline")
    handler = "leanfm.methods.diffusion.apply:apply_steps"
    produces = "sampling-schedule"
    search_space = {"steps": Choice(1, 2, 4, 8)}

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
    of at least 2 steps to save anything. On an ONNX graph the cached feature is the input of its
    last upsampling (Resize) node; on a diffusers UNet, the output of its second-to-last up block.
    """

    method = "deepcache"
    families = ("diffusion", "diffusion-pipeline")
    handler = "leanfm.methods.diffusion.apply:apply_deepcache"
    produces = "feature-cache"
    search_space = {"interval": Choice(2, 3)}

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
    search_space = {"activations": Choice(False, True)}

    activations: bool = False
    calib_seeds: int = 8

    def validate(self) -> None:
        if not isinstance(self.activations, bool):
            raise LeanfmError(f"onnx-int8 activations={self.activations!r} must be true or false")
        if not _whole(self.calib_seeds) or self.calib_seeds < 1:
            raise LeanfmError(f"onnx-int8 calib_seeds={self.calib_seeds!r} must be a whole number >= 1")


@dataclass
class DpmSolverConfig(_DenoiserEffect, BaseConfig):
    """Replace a diffusers pipeline's scheduler by DPM-Solver (Lu et al., NeurIPS 2022; DPM-Solver++,
    Lu et al., 2022): a multistep high-order ODE solver that keeps quality at far fewer steps
    (pair it with a ``sampling-steps`` step). The noise schedule is the pipeline's own.

    order: solver order, 1 to 3 (2: DPM-Solver++(2M), the usual choice for guided sampling).
    algorithm: "dpmsolver++" (data prediction) or "dpmsolver" (noise prediction).
    """

    method = "dpm-solver"
    families = ("diffusion-pipeline",)
    handler = "leanfm.methods.diffusion.apply:apply_dpm_solver"
    produces = "scheduler"
    search_space = {"order": Choice(1, 2, 3)}

    order: int = 2
    algorithm: str = "dpmsolver++"

    def validate(self) -> None:
        if not _whole(self.order) or not 1 <= self.order <= 3:
            raise LeanfmError(f"dpm-solver order={self.order!r} must be 1, 2 or 3")
        if self.algorithm not in ("dpmsolver++", "dpmsolver"):
            raise LeanfmError(f"dpm-solver algorithm={self.algorithm!r} must be dpmsolver++ or dpmsolver")


@dataclass
class TomeUnetConfig(_DenoiserEffect, BaseConfig):
    """ToMe for Stable Diffusion (Bolya & Hoffman, CVPR-W 2023): in the self-attention of the UNet's
    transformer blocks, merge a fraction of the image tokens into similar ones before attention
    and copy the results back after (unmerge), so attention runs on fewer tokens; nothing trained.

    ratio: fraction of a block's tokens merged away, 0 <= ratio < 1 (0.5: attention on half).
    max_downsample: merge only in blocks whose resolution is the latent's divided by at most this
    (1: the highest-resolution blocks, where attention costs most).
    stride: each stride x stride cell of the token grid keeps one destination token.
    seed: which token of each cell is the destination is drawn at random per call from this seed
    (reset for every batch of samples, so runs repeat).
    """

    method = "tome-unet"
    families = ("diffusion-pipeline",)
    handler = "leanfm.methods.diffusion.apply:apply_tome_unet"
    produces = "token-merging"
    search_space = {"ratio": Choice(0.3, 0.5, 0.7)}

    ratio: float = 0.5
    max_downsample: int = 1
    stride: int = 2
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise LeanfmError(f"tome-unet ratio={self.ratio!r} must be a number with 0 <= ratio < 1 (fraction of tokens merged)")
        if not _whole(self.max_downsample) or self.max_downsample not in (1, 2, 4, 8):
            raise LeanfmError(f"tome-unet max_downsample={self.max_downsample!r} must be 1, 2, 4 or 8")
        if not _whole(self.stride) or self.stride < 2:
            raise LeanfmError(f"tome-unet stride={self.stride!r} must be a whole number >= 2")
        if not _whole(self.seed):
            raise LeanfmError(f"tome-unet seed={self.seed!r} must be a whole number")
