"""Pruning techniques: ``magnitude``, ``wanda`` and ``sparsegpt`` configs and their handlers.

All three zero weights in place in the fp32 ``nn.Linear`` layers (a masked dense weight): no
sparse kernel runs, so every step reports ``simulated: true`` and the dense-GEMM ``kernel``;
memory and speed stay those of the dense model. The math is in :mod:`.masks` and
:mod:`.sparsegpt_math`.

Calibration-based methods (Wanda, SparseGPT) run layer by layer with
:class:`~leanfm.methods.layers.LayerwiseRunner`, as GPTQ does: each decoder layer sees the
outputs of the already-pruned earlier layers, and only one layer's inputs are held at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...config import BaseConfig, register
from ...errors import LeanfmError
from ..layers import LayerwiseRunner, decoder_layers, targets_in
from ..quantize.gptq import check_calibration, check_obs_params
from ..quantize.gptq_math import HessianAccumulator
from ..quantize.grid import check_bits, fake_quantize, resolve_group_size
from ..targets import iter_linears
from .masks import InputNorms, magnitude_scores, nm_mask, outlier_ratio, owl_sparsities, parse_pattern, unstructured_mask, wanda_scores
from .sparsegpt_math import sparsegpt_prune

KERNEL = "dense fp32 GEMM on masked weights (sparsity simulated)"
CSR_KERNEL = "torch.sparse.mm on CSR weights (int32 indices)"
ALLOCATIONS = ("uniform", "owl")
BACKENDS = ("masked", "csr")


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

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
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

    def check_model(self, model: nn.Module) -> None:
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


def check_not_packed(model: nn.Module, method: str) -> None:
    """Packed quantized layers (QuantLinear, FusedSlice: modules with ``quantized_weight`` that
    are not nn.Linear) cannot be masked: refuse instead of silently pruning nothing."""
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) and callable(getattr(mod, "quantized_weight", None)):
            raise LeanfmError(
                f"cannot apply {method}: layer {name} holds packed {getattr(mod, 'bits', '?')}-bit quantized weights; "
                "prune the full-precision model first, then quantize (or use sparsegpt with bits for both at once)"
            )


@dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: drop the smallest |W| of each layer (no calibration data)."""

    method = "magnitude"


@dataclass
class WandaConfig(PruneConfig):
    """Wanda (Sun et al., 2023): drop the smallest |W_ij|·||X_j|| of each output row."""

    method = "wanda"
    needs_calibration = True


@dataclass
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh, 2023): OBS-based pruning with weight reconstruction.

    block_size: columns per mask choice and lazy update (paper: 128; a multiple of M for N:M).
    damp: fraction of the mean Hessian diagonal added for stability (paper: 0.01).
    bits: if set (2..8), also quantize the kept weights jointly (written back fake-quantized).
    group_size / symmetric: the joint quantization grid, as for GPTQ (null = per output channel).
    """

    method = "sparsegpt"
    needs_calibration = True
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True

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

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if self.bits is not None:
            for name, mod in self.targets(model).items():
                resolve_group_size(mod.in_features, self.group_size, name)


# ---------------------------------------------------------------- shared glue


def _mask(scores: torch.Tensor, cfg: PruneConfig, sparsity: float, per_row: bool) -> torch.Tensor:
    nm = cfg.nm
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per_row)


@torch.no_grad()
def _zero(lin: nn.Linear, keep: torch.Tensor) -> None:
    lin.weight.masked_fill_(~keep.to(lin.weight.device), 0.0)


def _layer_groups(model: nn.Module, targets: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """Targets grouped by decoder layer (layers without targets left out)."""
    groups = [targets_in(layer, targets) for layer in decoder_layers(model)]
    return [g for g in groups if g]


def _owl_plan(cfg: PruneConfig, names_per_layer: list[list[str]], ratios: list[float], targets) -> tuple[dict, dict]:
    """Per-target sparsity from OWL (targets outside decoder layers keep the target sparsity)."""
    layer_s = owl_sparsities(ratios, cfg.target_sparsity, cfg.owl_lambda)
    plan = {n: cfg.target_sparsity for n in targets}
    for names, s in zip(names_per_layer, layer_s):
        plan.update({n: s for n in names})
    extra = {"layer_sparsity": [round(s, 5) for s in layer_s], "outlier_ratio": [round(r, 6) for r in ratios]}
    return plan, extra


def _layerwise(model, calib, targets, make_stat: Callable, on_layer: Callable, desc: str) -> list[str]:
    """Run the calibration set layer by layer; for each decoder layer collect one input
    statistic per target inside it (``make_stat(module)`` with ``.add(x)``), then call
    ``on_layer(mods, stats)``, which may change the weights before the layer's outputs are
    recomputed for the next layer. Returns the targets outside every decoder layer."""
    runner = LayerwiseRunner(model, calib)
    seen: set[str] = set()

    def process(i: int, layer: nn.Module) -> None:
        mods = targets_in(layer, targets)
        seen.update(mods)
        on_layer(mods, runner.collect_inputs(i, mods, make_stat))

    runner.run(process, desc)
    return [n for n in targets if n not in seen]


def _owl_from_calibration(model, cfg, calib, targets) -> tuple[dict, dict]:
    """OWL outlier ratios from Wanda scores of the dense model (a first, read-only pass)."""
    names, ratios = [], []

    def record(mods, stats):
        if mods:
            names.append(list(mods))
            ratios.append(outlier_ratio([wanda_scores(m.weight, stats[n].norms) for n, m in mods.items()], cfg.owl_m))

    _layerwise(model, calib, targets, lambda m: InputNorms(m.in_features), record, "owl (outlier ratios)")
    return _owl_plan(cfg, names, ratios, targets)


def _plan(model, cfg, calib, targets) -> tuple[dict, dict]:
    if cfg.allocation != "owl":
        return {n: cfg.target_sparsity for n in targets}, {}
    if calib is not None:
        return _owl_from_calibration(model, cfg, calib, targets)
    groups = _layer_groups(model, targets)  # magnitude: outliers of |W| (no activations)
    ratios = [outlier_ratio([magnitude_scores(m.weight) for m in g.values()], cfg.owl_m) for g in groups]
    return _owl_plan(cfg, [list(g) for g in groups], ratios, targets)


def _info(cfg: PruneConfig, targets: dict[str, nn.Linear], extra: dict, model: nn.Module) -> dict:
    zeros = sum(int((m.weight == 0).sum()) for m in targets.values())
    total = sum(m.weight.numel() for m in targets.values())
    nm = cfg.nm
    if cfg.backend == "csr":
        from ...kernels.sparse import to_sparse_

        for name in targets:
            parent, _, child = name.rpartition(".")
            to_sparse_(model.get_submodule(parent), child)
    return {
        "simulated": cfg.backend == "masked",
        "kernel": KERNEL if cfg.backend == "masked" else CSR_KERNEL,
        "layers": len(targets),
        "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
        "sparsity_target": round(cfg.target_sparsity, 6),
        "sparsity_achieved": zeros / total,
        **extra,
    }


def _magnitude_fallback(cfg: PruneConfig, targets, names: list[str], plan: dict) -> dict:
    """Targets outside the decoder stack (e.g. an unskipped lm_head) see no layer inputs:
    prune them by magnitude (and round them when SparseGPT quantizes jointly)."""
    bits = getattr(cfg, "bits", None)
    for n in names:
        lin = targets[n]
        _zero(lin, _mask(magnitude_scores(lin.weight), cfg, plan[n], per_row=False))
        if bits is not None:
            with torch.no_grad():  # zero is on every grid, so pruned weights stay exactly 0
                lin.weight.copy_(fake_quantize(lin.weight.detach(), bits, cfg.group_size, cfg.symmetric))
    return {"magnitude_fallback": names} if names else {}


# ---------------------------------------------------------------- handlers


@register(MagnitudeConfig)
def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, calib=None) -> dict:
    cfg.check_model(model)
    targets = cfg.targets(model)
    plan, extra = _plan(model, cfg, None, targets)
    for name, lin in targets.items():
        _zero(lin, _mask(magnitude_scores(lin.weight), cfg, plan[name], per_row=False))
    return _info(cfg, targets, extra, model)


@register(WandaConfig)
def apply_wanda(model: nn.Module, cfg: WandaConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, "wanda")
    targets = cfg.targets(model)
    plan, extra = _plan(model, cfg, calib, targets)

    def prune(mods, stats):
        for n, m in mods.items():
            _zero(m, _mask(wanda_scores(m.weight, stats.pop(n).norms), cfg, plan[n], per_row=True))

    rest = _layerwise(model, calib, targets, lambda m: InputNorms(m.in_features), prune, "wanda (layer by layer)")
    extra.update(_magnitude_fallback(cfg, targets, rest, plan))
    return {**_info(cfg, targets, extra, model), "calibration_tokens": int(calib.numel())}


@register(SparseGPTConfig)
def apply_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, "sparsegpt")
    targets = cfg.targets(model)
    plan, extra = _plan(model, cfg, calib, targets)

    def prune(mods, stats):
        for n, m in mods.items():
            res = sparsegpt_prune(m.weight.detach(), stats.pop(n).H, plan[n], cfg.nm, cfg.block_size, cfg.damp,
                                  cfg.bits, cfg.group_size, cfg.symmetric)
            with torch.no_grad():
                m.weight.copy_(res.weight.to(m.weight.dtype))

    rest = _layerwise(model, calib, targets, lambda m: HessianAccumulator(m.in_features), prune, "sparsegpt (layer by layer)")
    extra.update(_magnitude_fallback(cfg, targets, rest, plan))
    return {**_info(cfg, targets, extra, model), "calibration_tokens": int(calib.numel())}
