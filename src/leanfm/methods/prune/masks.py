"""Pruning scores, masks and layerwise sparsity allocation: pure tensor functions, no model code.

A weight ``W`` has shape ``[out, in]``; a *mask* is a bool tensor of the same shape that is
True where the weight is kept. Scores are "importance": the lowest-scored weights are pruned.

- Magnitude: ``S_ij = |W_ij|`` (the classic baseline; compared per layer, as in the Wanda
  paper's magnitude baseline).
- Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models",
  Eq. 1): ``S_ij = |W_ij| · ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input feature ``j``
  over all calibration tokens; weights are compared *per output row* (§3, "comparison group").
- N:M (semi-structured): in every group of M consecutive input weights of a row, keep exactly
  the N highest-scored ones (e.g. 2:4, the pattern of NVIDIA sparse tensor cores).
- OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity"): layers with more outlier
  scores get a lower sparsity, the mean sparsity stays the target (§4, Eq. for ``S_l``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ...errors import LeanfmError
from .decl import parse_pattern  # noqa: F401 (torch-free, used by the declarations; re-exported)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return w.detach().float().abs()


class InputNorms:
    """Running ``||X_j||_2`` per input feature ``j`` over every calibration token seen (Wanda)."""

    def __init__(self, in_features: int):
        self.sumsq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sumsq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()


def wanda_scores(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda Eq. 1: ``S_ij = |W_ij| · ||X_j||_2`` for ``W [out, in]`` and norms ``[in]``."""
    if input_norms.shape != (w.shape[1],):
        raise LeanfmError(f"Wanda needs one input norm per column: W {tuple(w.shape)}, norms {tuple(input_norms.shape)}")
    return w.detach().float().abs() * input_norms.float().unsqueeze(0)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask pruning the lowest scores in each comparison group: each row (``per_row``,
    Wanda) or the whole matrix (magnitude). Exactly ``round(sparsity · numel)`` weights are
    pruned in total, ties broken arbitrarily; per row, each row prunes ``floor`` or ``ceil`` of
    ``sparsity · in_features`` (the first rows take the remainder), so per-row rounding never
    biases a layer's sparsity."""
    if not 0 <= sparsity <= 1:
        raise LeanfmError(f"sparsity {sparsity} is outside [0, 1]")
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    rows, cols = flat.shape
    total = int(round(sparsity * rows * cols))
    counts = torch.full((rows, 1), total // rows)
    counts[: total % rows] += 1
    rank = torch.empty_like(flat, dtype=torch.long)
    rank.scatter_(1, torch.argsort(flat, dim=1), torch.arange(cols).expand(rows, cols).contiguous())
    return (rank >= counts).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` kept (the highest scores) in every group of ``m``
    consecutive columns of each row; ``in_features`` must be divisible by ``m``."""
    rows, cols = scores.shape
    if not 1 <= n < m or cols % m:
        raise LeanfmError(f"N:M mask needs 1 <= N < M and M dividing in_features; got {n}:{m} for {cols} columns")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)  # topk returns exactly n indices, ties included
    return keep.reshape(rows, cols)


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution (LOD): the fraction of a decoder layer's scores
    (all its linears together) larger than ``m`` times their mean (§4, "outlier ratio")."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL per-layer sparsity from per-layer outlier ratios ``D_l``.

    As in the paper (§4) and its reference code: ``D_l`` is min-max normalized to ``[0, 2λ]``
    and ``S_l = S - (D̂_l - mean(D̂))`` (more outliers, less pruning; mean sparsity ``S``).
    The paper bounds ``S_l`` to ``[S - λ, S + λ]``; clipping alone would move the mean, so we
    clip ``S_l + c`` and pick the shift ``c`` (bisection; the clipped mean is monotone in ``c``)
    that brings the mean back to ``S`` exactly.
    """
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        return []
    span = float(r.max() - r.min())
    if span == 0 or lam == 0:
        return [float(target)] * r.numel()
    d = (r - r.min()) / span * (2 * lam)
    base = target - (d - d.mean())
    lo, hi = target - lam, target + lam
    c_lo, c_hi = lo - float(base.max()), hi - float(base.min())  # all at lo / all at hi
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        if float((base + c).clamp(lo, hi).mean()) < target:
            c_lo = c
        else:
            c_hi = c
    return [float(v) for v in (base + 0.5 * (c_lo + c_hi)).clamp(lo, hi)]
