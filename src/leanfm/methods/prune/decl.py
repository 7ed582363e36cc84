"""Declarations of the pruning methods ``magnitude``, ``wanda`` and ``sparsegpt`` (no torch).

Each config holds its parameters, validation and cost effect; the handlers that zero weights
live in :mod:`.sparsity` and are imported on first apply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ..effects import JointRule, QuantSpec, Rule, SparsitySpec
from ..quantize.decl import check_bits, check_obs_params
from ...space import Choice, Range

ALLOCATIONS = ("uniform", "owl")
BACKENDS = ("masked", "csr")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``; else LeanfmError."""
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 60:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 2*60+4 = 124
        n, m = divmod(pattern, 60)
        raise LeanfmError(
            f"pattern {pattern} is not a string: YAML reads an unquoted {n}:{m} as the base-60 number {pattern}; "
            f"quote it: pattern: \"{n}:{m}\""
        )
    if not isinstance(pattern, str):
        raise LeanfmError(f"pattern {pattern!r} must be a string: 'unstructured' or N:M such as '2:4'")
    if pattern.strip().lower() == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise LeanfmError(f"pattern '{pattern}' is malformed; use 'unstructured' or N:M (keep N of every M weights) such as '2:4' or '4:8'")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise LeanfmError(
            f"pattern '{pattern}' keeps N={n} of every M={m} weights; N must be at least 1 and smaller than M (e.g. '2:4')"
        )
    return n, m


@dataclass
class PruneConfig(BaseConfig):
    """Fields shared by the pruning methods.

    sparsity: fraction of each target layer's weights set to zero, in (0, 1); default 0.5 for
        unstructured pruning. An N:M pattern fixes it at 1 - N/M (2:4 and 4:8 give 0.5): leave
        it out, or give exactly that value (anything else is an error).
    pattern: "unstructured", or "N:M" to keep N of every M consecutive input weights of each
        output row (e.g. "2:4", "4:8"; quote it in YAML, where a bare 2:4 reads as the number 124).
    allocation: "uniform" (every layer at `sparsity`) or "owl" (unstructured only: decoder layers
        with more outlier scores are pruned less, the mean stays `sparsity`; Yin et al., 2023).
        Wanda and SparseGPT count outliers of the Wanda score |W|·||X|| in a first, read-only
        calibration pass over the dense model (as OWL's code does); magnitude, which sees no
        activations, counts outliers of |W|. The step records `layer_sparsity` and `outlier_ratio`.
    owl_m: OWL's outlier threshold M (a score is an outlier above M times its layer's mean; paper: 5).
    owl_lambda: OWL's λ, the largest deviation of a layer's sparsity from `sparsity` (paper: 0.08).
    skip: linear layers left dense (names or fnmatch patterns; lm_head by default).
    only: if given, prune just the linears matching these patterns.
    backend: "masked" (default: zeros in the dense fp32 weight, dense GEMM; simulated: true) or
        "csr" (store the pruned layers as CSR and multiply with torch's sparse kernel; real,
        and measured — on CPU it is usually slower than dense at 50%).
    """

    produces = "sparse-weights"
    search_space = {"pattern": Choice("unstructured", "2:4"),
                    "sparsity": Range(0.1, 0.6, step=0.05, when={"pattern": "unstructured"})}

    sparsity: float | None = None
    pattern: str | int = "unstructured"
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    skip: tuple[str, ...] = ("lm_head",)
    only: tuple[str, ...] = ()
    backend: str = "masked"

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def targets(self, model) -> dict:
        """``{name: nn.Linear}`` of the layers this step prunes."""
        from ..targets import iter_linears

        return dict(iter_linears(model, self.skip, self.only))

    def validate(self) -> None:
        nm = self.nm
        s = self.sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1):
            raise LeanfmError(f"sparsity {s} is outside (0, 1); use a fraction such as 0.5")
        if nm is not None and s is not None and abs(s - (1 - nm[0] / nm[1])) > 1e-9:
            raise LeanfmError(
                f"sparsity {s} contradicts pattern '{self.pattern}', which prunes {nm[1] - nm[0]} of every {nm[1]} weights "
                f"(sparsity {1 - nm[0] / nm[1]:g}); leave sparsity out or set it to {1 - nm[0] / nm[1]:g}"
            )
        if self.backend not in BACKENDS:
            raise LeanfmError(f"unknown backend '{self.backend}' for {self.method}; use one of: {', '.join(BACKENDS)}")
        if self.allocation not in ALLOCATIONS:
            raise LeanfmError(f"unknown allocation '{self.allocation}' for {self.method}; use one of: {', '.join(ALLOCATIONS)}")
        if self.allocation == "owl":
            if nm is not None:
                raise LeanfmError(f"allocation owl is for unstructured sparsity only; pattern '{self.pattern}' fixes every layer at "
                                  "1 - N/M (use allocation: uniform)")
            t = self.target_sparsity
            if not self.owl_m > 0:
                raise LeanfmError(f"owl_m={self.owl_m} must be positive (paper: 5)")
            if not 0 <= self.owl_lambda < min(t, 1 - t):
                raise LeanfmError(f"owl_lambda={self.owl_lambda} must be in [0, {min(t, 1 - t):g}) so every layer's sparsity stays "
                                  f"inside (0, 1) around {t:g} (paper: 0.08)")

    def onload_check(self) -> str | None:
        if self.allocation == "owl":
            return (f"{self.method} with allocation owl needs every layer's outlier ratios before it prunes the first; "
                    "use allocation: uniform to compress onloaded")
        return None

    def check_model(self, model) -> None:
        from .sparsity import check_not_packed

        check_not_packed(model, self.method)
        targets = self.targets(model)
        if not targets:
            raise LeanfmError(f"{self.method} found no nn.Linear layers to prune (check 'skip' and 'only')")
        nm = self.nm
        for name, mod in targets.items():
            if nm is not None and mod.in_features % nm[1]:
                raise LeanfmError(
                    f"pattern '{self.pattern}' needs in_features divisible by {nm[1]}, but layer {name} has {mod.in_features}; "
                    f"use a pattern whose M divides it, or skip the layer"
                )

    def joint_quant(self) -> QuantSpec | None:
        """The quantization applied together with the pruning (None: pruning only)."""
        return None

    def effect(self, eff) -> None:
        spec = SparsitySpec(self.method, self.target_sparsity, self.nm, str(self.backend))
        skip, only = tuple(self.skip), tuple(self.only)
        joint = self.joint_quant()
        eff.rules.append(JointRule(spec, skip, only, joint=joint) if joint else Rule(spec, skip, only))


@dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: drop the smallest |W| of each layer (no calibration data)."""

    method = "magnitude"
    families = ("causal-lm", "vit", "clip", "diffusion-pipeline")
    handler = "leanfm.methods.prune.sparsity:apply_magnitude"


@dataclass
class WandaConfig(PruneConfig):
    """Wanda (Sun et al., 2023): drop the smallest |W_ij|·||X_j|| of each output row."""

    method = "wanda"
    families = ("causal-lm", "vit")  # a ViT calibrates on images
    handler = "leanfm.methods.prune.sparsity:apply_wanda"
    needs_calibration = True
    onload = "layerwise"


@dataclass
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh, 2023): OBS-based pruning with weight reconstruction.

    block_size: columns per mask choice and lazy update (paper: 128; a multiple of M for N:M).
    damp: fraction of the mean Hessian diagonal added for stability (paper: 0.01).
    bits: if set (2..8), also quantize the kept weights jointly (written back fake-quantized).
    group_size / symmetric: the joint quantization grid, as for GPTQ (null = per output channel).
    """

    method = "sparsegpt"
    families = ("causal-lm", "vit")  # a ViT calibrates on images
    handler = "leanfm.methods.prune.sparsity:apply_sparsegpt"
    needs_calibration = True
    onload = "layerwise"
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True

    def layer_work_bytes(self, linears: list[tuple[int, int]], inputs: list[int] | None = None) -> int:
        # as GPTQ: one fp32 Hessian [in, in] per linear of the layer, then the solve of one
        return sum(i * i for i, _ in linears) * 4 + max(i * i * 4 * 2 + i * o * 4 * 3 for i, o in linears)

    def validate(self) -> None:
        super().validate()
        check_obs_params(self.damp, self.block_size)
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise LeanfmError(f"block_size={self.block_size} must be a multiple of M={nm[1]} for pattern '{self.pattern}'")
        if self.bits is not None:
            check_bits(self.bits)
        elif self.group_size is not None:
            raise LeanfmError("group_size only applies to joint quantization: set bits (e.g. bits: 4) or drop group_size")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for per-channel)")

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.bits is not None:
            from ..quantize.grid import resolve_group_size

            for name, mod in self.targets(model).items():
                resolve_group_size(mod.in_features, self.group_size, name)

    def joint_quant(self) -> QuantSpec | None:
        """With ``bits``: the kept weights fake-quantized jointly (simulated: fp32 values)."""
        if self.bits is None:
            return None
        return QuantSpec(self.method, int(self.bits), self.group_size, bool(self.symmetric), "fake", simulated=True)
