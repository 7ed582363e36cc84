"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization"): pure tensor functions.

Scale search (§3.2): a few input channels carry large activations; scaling their weight columns
up by ``s`` before quantization (and the activations down by ``1/s``, folded into the previous
op) shrinks their relative rounding error. ``s = mean|x|^α`` with α chosen on a grid of [0, 1)
to minimize the output error ``Σ_i ||X W_iᵀ - (X/s) Q(W_i·s)ᵀ||²`` (Eq. 4-5).
Clip search (the reference's ``auto_clip``): per (row, group), shrink the quantization range to
``r · max|w|`` with the ratio ``r`` that minimizes that group's output error.
"""
from __future__ import annotations

import torch

from .grid import fake_quantize as fake_quant


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, gs: int, symmetric: bool, n_grid: int = 20,
    rounding: str = "nearest",
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale ``s [in]`` and the chosen α for linears sharing the input ``x [T, in]``
    (``rounding``: the grid the weights will be rounded on, see ``grid.grid_quantize``)."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    ref = [x @ w.float().t() for w in weights]
    best, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # center the scales (reference implementation)
        xs = x / s
        loss = sum(((xs @ fake_quant(w.float() * s, bits, gs, symmetric, rounding).t() - r) ** 2).mean().item() for w, r in zip(weights, ref))
        if loss < best:
            best, best_s, best_a = loss, s, a
    return best_s, best_a


def search_clip(
    x: torch.Tensor, w: torch.Tensor, bits: int, gs: int, symmetric: bool, n_grid: int = 20, max_shrink: float = 0.5,
    row_chunk: int = 256, rounding: str = "nearest",
) -> torch.Tensor:
    """Per-(row, group) clip bound ``[out, groups]`` on ``|w|`` minimizing the group's output error."""
    x = x.float()
    n, k = w.shape
    g = k // gs
    xg = x.reshape(-1, g, gs)  # [T, G, gs]
    out = []
    for r0 in range(0, n, row_chunk):
        wc = w[r0 : r0 + row_chunk].float()
        wg = wc.reshape(-1, g, gs)
        org_max = wg.abs().amax(dim=-1)  # [rows, G]
        ref = torch.einsum("tgk,ngk->tng", xg, wg)
        best = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wg, mx.unsqueeze(-1)), -mx.unsqueeze(-1)).reshape(-1, k)
            q = fake_quant(clipped, bits, gs, symmetric, rounding).reshape(-1, g, gs)
            err = ((torch.einsum("tgk,ngk->tng", xg, q) - ref) ** 2).mean(dim=0)  # [rows, G]
            better = err < best
            best = torch.where(better, err, best)
            best_max = torch.where(better, mx, best_max)
        out.append(best_max)
    return torch.cat(out)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, gs: int) -> torch.Tensor:
    n, k = w.shape
    m = max_val.unsqueeze(-1)
    return torch.maximum(torch.minimum(w.reshape(n, -1, gs), m), -m).reshape(n, k)
