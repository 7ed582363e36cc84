"""Pruning techniques: the ``magnitude``, ``wanda`` and ``sparsegpt`` handlers (configs in :mod:`.decl`).

All three zero weights in place in the fp32 ``nn.Linear`` layers (a masked dense weight): no
sparse kernel runs, so every step reports ``simulated: true`` and the dense-GEMM ``kernel``;
memory and speed stay those of the dense model. The math is in :mod:`.masks` and
:mod:`.sparsegpt_math`.

Calibration-based methods (Wanda, SparseGPT) run layer by layer with
:class:`~leanfm.methods.layers.LayerwiseRunner`, as GPTQ does: each decoder layer sees the
outputs of the already-pruned earlier layers, and only one layer's inputs are held at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...errors import LeanfmError
from ..layers import LayerwiseRunner, decoder_layers, targets_in
from ..quantize.gptq import calibration_info, check_calibration
from ..quantize.gptq_math import HessianAccumulator
from ..quantize.grid import fake_quantize
from .decl import ALLOCATIONS, BACKENDS, MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig  # noqa: F401 (re-exported)
from .masks import InputNorms, magnitude_scores, nm_mask, outlier_ratio, owl_sparsities, unstructured_mask, wanda_scores
from .sparsegpt_math import sparsegpt_prune

KERNEL = "dense fp32 GEMM on masked weights (sparsity simulated)"
CSR_KERNEL = "torch.sparse.mm on CSR weights (int32 indices)"


def check_not_packed(model: nn.Module, method: str) -> None:
    """Packed quantized layers (QuantLinear, FusedSlice: modules with ``quantized_weight`` that
    are not nn.Linear) cannot be masked: refuse instead of silently pruning nothing."""
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) and callable(getattr(mod, "quantized_weight", None)):
            raise LeanfmError(
                f"cannot apply {method}: layer {name} holds packed {getattr(mod, 'bits', '?')}-bit quantized weights; "
                "prune the full-precision model first, then quantize (or use sparsegpt with bits for both at once)"
            )


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


def _layerwise(model, calib, targets, make_stat: Callable, on_layer: Callable, desc: str, done: Callable | None = None) -> list[str]:
    """Run the calibration set layer by layer; for each decoder layer collect one input
    statistic per target inside it (``make_stat(module)`` with ``.add(x)``), then call
    ``on_layer(mods, stats)``, which may change the weights before the layer's outputs are
    recomputed for the next layer; ``done(mods)`` once they are. Returns the targets outside
    every decoder layer."""
    runner = LayerwiseRunner(model, calib)
    seen: set[str] = set()
    current: dict = {}

    def process(i: int, layer: nn.Module) -> None:
        mods = targets_in(layer, targets)
        seen.update(mods)
        current.clear()
        current.update(mods)
        on_layer(mods, runner.collect_inputs(i, mods, make_stat))

    runner.run(process, desc, (lambda i, layer: done(dict(current))) if done is not None else None)
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


class _Tally:
    """Zeros and weights of the pruned layers, counted as each layer is finished (an onloaded
    layer is gone from memory afterwards), and the CSR conversion of each layer then."""

    def __init__(self, cfg: PruneConfig, model: nn.Module):
        self.cfg, self.model, self.zeros, self.total, self.layers = cfg, model, 0, 0, 0

    def __call__(self, mods: dict[str, nn.Linear]) -> None:
        for name, m in mods.items():
            self.zeros += int((m.weight == 0).sum())
            self.total += m.weight.numel()
            self.layers += 1
            if self.cfg.backend == "csr":
                from ...kernels.sparse import to_sparse_

                parent, _, child = name.rpartition(".")
                to_sparse_(self.model.get_submodule(parent), child)

    def info(self, extra: dict) -> dict:
        cfg, nm = self.cfg, self.cfg.nm
        return {
            "simulated": cfg.backend == "masked",
            "kernel": KERNEL if cfg.backend == "masked" else CSR_KERNEL,
            "layers": self.layers,
            "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
            "sparsity_target": round(cfg.target_sparsity, 6),
            "sparsity_achieved": self.zeros / self.total,
            **extra,
        }


def _info(cfg: PruneConfig, targets: dict[str, nn.Linear], extra: dict, model: nn.Module) -> dict:
    tally = _Tally(cfg, model)
    tally(targets)
    return tally.info(extra)


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


def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, calib=None) -> dict:
    cfg.check_model(model)
    targets = cfg.targets(model)
    plan, extra = _plan(model, cfg, None, targets)
    for name, lin in targets.items():
        _zero(lin, _mask(magnitude_scores(lin.weight), cfg, plan[name], per_row=False))
    return _info(cfg, targets, extra, model)


def _prune_layerwise(model: nn.Module, cfg, calib: torch.Tensor, make_stats, prune_one) -> dict:
    """Calibrated pruning, one decoder layer at a time: ``make_stats(linear)`` collects each
    target's input statistics, ``prune_one(linear, stats, sparsity)`` prunes it in place."""
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    targets = cfg.targets(model)
    plan, extra = _plan(model, cfg, calib, targets)

    def prune(mods, stats):
        for n, m in mods.items():
            prune_one(m, stats.pop(n), plan[n])

    tally = _Tally(cfg, model)
    rest = _layerwise(model, calib, targets, make_stats, prune, f"{cfg.method} (layer by layer)", tally)
    extra.update(_magnitude_fallback(cfg, targets, rest, plan))
    tally({n: targets[n] for n in rest})
    return {**tally.info(extra), **calibration_info(calib)}


def apply_wanda(model: nn.Module, cfg: WandaConfig, calib: torch.Tensor) -> dict:
    def prune_one(m, st, sparsity):
        _zero(m, _mask(wanda_scores(m.weight, st.norms), cfg, sparsity, per_row=True))

    return _prune_layerwise(model, cfg, calib, lambda m: InputNorms(m.in_features), prune_one)


def apply_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, calib: torch.Tensor) -> dict:
    def prune_one(m, st, sparsity):
        res = sparsegpt_prune(m.weight.detach(), st.H, sparsity, cfg.nm, cfg.block_size, cfg.damp,
                              cfg.bits, cfg.group_size, cfg.symmetric)
        with torch.no_grad():
            m.weight.copy_(res.weight.to(m.weight.dtype))

    return _prune_layerwise(model, cfg, calib, lambda m: HessianAccumulator(m.in_features), prune_one)
