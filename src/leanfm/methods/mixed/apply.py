"""Mixed-precision handler: score (or load cached scores), allocate, quantize, install.

1. sensitivity scores per (layer, format) (:mod:`.score`, cached on disk);
2. one format per layer by a multiple-choice knapsack under the byte budget (:mod:`.allocate`);
3. each layer quantized in its format: RTN directly, or GPTQ in one layer-by-layer pass
   (:class:`~leanfm.methods.layers.LayerwiseRunner`, each layer's Hessian from the outputs of
   the already-quantized layers before it, as :func:`~leanfm.methods.quantize.gptq.apply_gptq`);
4. packed by :func:`~leanfm.methods.quantize.common.install` (each layer its own backend under ``auto``).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ...errors import LeanfmError
from ...kernels import backends
from ..layers import capture_inputs, group_by_input
from ..quantize.common import check_not_quantized, install
from ..quantize.gptq import check_calibration, gptq_layerwise
from ..quantize.grid import rtn_quantize
from .allocate import allocate
from .decl import MixedPrecisionConfig, WeightFormat, candidates, check_budget
from .score import scores_for


def _shapes(targets: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in targets.items()}


def check_mixed(cfg: MixedPrecisionConfig, model: nn.Module) -> tuple[dict, dict[str, list[WeightFormat]], int]:
    """Targets, per-layer candidate formats and the budget in bytes; one-line errors before any work."""
    targets = cfg.targets(model)
    check_not_quantized(model, cfg.method, bool(targets))
    if not targets:
        raise LeanfmError("mixed_precision found no nn.Linear layers to quantize (check 'skip' and 'only')")
    shapes = _shapes(targets)
    cands = candidates(cfg, shapes)
    budget = check_budget(cfg, shapes)
    if cfg.backend not in ("auto", "fake"):
        be = backends.get(cfg.backend)
        for n, fs in cands.items():
            for f in fs:
                i, o = shapes[n]
                why = be.unsupported(backends.Layout(f.bits, f.group_size or i, i, o), cfg.symmetric)
                if why:
                    raise LeanfmError(f"layer {n}, format {f.name}: {why}; use backend: auto or reference")
    return targets, cands, budget


def sibling_groups(model: nn.Module, targets: dict[str, nn.Linear], ids: torch.Tensor) -> list[list[str]]:
    """Targets that read the same input (q/k/v, gate/up), found by one short forward, not by name."""
    seen: dict[str, torch.Tensor] = {}
    handles = capture_inputs(targets, lambda n, x: seen.setdefault(n, x))
    try:
        with torch.no_grad():
            model(input_ids=ids[:1, :8], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups = group_by_input(seen)
    return groups + [[n] for n in targets if n not in seen]


def solve(scores: dict[str, dict[str, float]], cands: dict[str, list[WeightFormat]], shapes: dict[str, tuple[int, int]],
          budget: int, groups: list[list[str]] | None = None) -> dict[str, WeightFormat]:
    """The knapsack allocation ``{layer: format}`` for one budget (no scoring). Each group of
    ``groups`` (default: every layer alone) gets one format, offered the formats that fit all its
    members, priced at its members' summed score and bytes."""
    items = []
    for g in groups or [[n] for n in cands]:
        common = [f for f in cands[g[0]] if all(f in cands[n] for n in g)]
        items += [(g, common)] if common else [([n], cands[n]) for n in g]
    costs = [[sum(scores[n][f.name] for n in g) for f in fs] for g, fs in items]
    sizes = [[sum(f.bytes(*shapes[n]) for n in g) for f in fs] for g, fs in items]
    picks = allocate(costs, sizes, budget)
    return {n: fs[p] for (g, fs), p in zip(items, picks) for n in g}


def _quantize_rtn(targets, alloc, symmetric):
    return {n: rtn_quantize(m.weight.detach(), alloc[n].bits, alloc[n].group_size, symmetric) for n, m in targets.items()}


def _quantize_gptq(model, targets, alloc, cfg, calib):
    return gptq_layerwise(model, targets, calib, lambda n: (alloc[n].bits, alloc[n].group_size, cfg.symmetric, "nearest"),
                          cfg.damp, cfg.block_size, cfg.act_order, label="mixed_precision gptq")


def apply_mixed_precision(model: nn.Module, cfg: MixedPrecisionConfig, calib: torch.Tensor) -> dict:
    targets, cands, budget = check_mixed(cfg, model)
    check_calibration(calib, cfg.method)
    shapes = _shapes(targets)
    score_ids = calib[: max(1, cfg.score_tokens // calib.shape[1])]
    scores, cached, secs, key = scores_for(model, targets, cands, cfg.symmetric, score_ids, [f.name for f in cfg.parsed_formats()])
    groups = sibling_groups(model, targets, calib) if cfg.tie_siblings else None
    alloc = solve(scores, cands, shapes, budget, groups)
    if cfg.algorithm == "gptq":
        qws = _quantize_gptq(model, targets, alloc, cfg, calib)
    else:
        qws = _quantize_rtn(targets, alloc, cfg.symmetric)
    stored = sum(alloc[n].bytes(*shapes[n]) for n in targets)
    params = sum(i * o for i, o in shapes.values())
    info = install(model, qws, cfg.backend)
    return {
        **info,
        "calibration_tokens": int(calib.numel()),
        "allocation": {n: f.name for n, f in alloc.items()},
        "format_counts": dict(Counter(f.name for f in alloc.values())),
        "budget_bytes": int(budget),
        "stored_bytes": int(stored),
        "stored_avg_bits": round(8 * stored / params, 4),
        "budget_avg_bits": round(8 * budget / params, 4),
        "tied_groups": sum(len(g) > 1 for g in groups or []),
        "score_sum": float(sum(scores[n][f.name] for n, f in alloc.items())),
        "scores": "cached" if cached else "computed",
        "scoring_seconds": round(secs, 3),
        "score_tokens": int(score_ids.numel()),
        "score_key": key[:16],
    }
