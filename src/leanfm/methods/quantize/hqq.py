"""HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023, mobiusml blog "HQQ"): calibration-free.

For each (row, group), the zero point is optimized (scale kept from min/max) to minimize an
l_p norm (p < 1, robust to outliers) of the weight error, by half-quadratic splitting:
  W_e <- shrink_p(W - dequant(Q(W)))                     (generalized soft-threshold, the prox of |.|^p)
  z   <- mean_group(Q(W) - (W - W_e) / s)                (closed-form zero update)
with the penalty beta growing by kappa each iteration; the best iterate is kept. The zero point
comes out fractional, which the packed format stores as a float per group.
"""
from __future__ import annotations


import torch
from torch import nn

from ...errors import LeanfmError
from .common import install
from .decl import HQQConfig
from .grid import QuantizedWeight, check_bits, choose_qparams, resolve_group_size


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    # prox of (1/beta)|x|^p, approximated as in the HQQ paper: sign(x) relu(|x| - |x|^(p-1) / beta)
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp(min=1e-12).pow(p - 1) / beta)


def hqq_quantize(
    w: torch.Tensor, bits: int, group_size: int | None = None, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01
) -> QuantizedWeight:
    """Asymmetric ``bits``-bit codes with HQQ-optimized (fractional) zero points."""
    check_bits(bits)
    rows, cols = w.shape
    gs = resolve_group_size(cols, group_size)
    maxq = 2**bits - 1
    scale, zero = choose_qparams(w, bits, gs, symmetric=False)  # min/max init, [rows, groups]
    W = w.detach().float().reshape(rows, cols // gs, gs)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1).clone()

    def err_of(z):
        q = torch.clamp(torch.round(W / s + z), 0, maxq)
        return q, (W - (q - z) * s)

    q, e = err_of(z)
    best_z, best_err = z.clone(), e.abs().pow(p).mean()
    for _ in range(iters):
        w_e = _shrink_lp(e, beta, p)
        z = torch.mean(q - (W - w_e) / s, dim=-1, keepdim=True)
        beta *= kappa
        q, e = err_of(z)
        cur = e.abs().pow(p).mean()
        if cur < best_err:
            best_z, best_err = z.clone(), cur
        else:
            break
    codes = torch.clamp(torch.round(W / s + best_z), 0, maxq).reshape(rows, cols).to(torch.uint8)
    return QuantizedWeight(codes, scale, best_z.squeeze(-1), bits, gs)


def apply_hqq(model: nn.Module, cfg: HQQConfig, calib=None) -> dict:
    cfg.check_model(model)
    qws = {
        n: hqq_quantize(m.weight.detach(), cfg.bits, cfg.group_size, cfg.iters, cfg.p, cfg.beta, cfg.kappa)
        for n, m in cfg.targets(model).items()
    }
    return install(model, qws, cfg.backend)
