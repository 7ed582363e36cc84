"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): pure tensor functions, no model code.

Minimizes ||W X - Q(W) X||² column by column. With ``H = 2 X Xᵀ`` (Eq. 1-2), quantizing column
``i`` to ``q`` and updating the not-yet-quantized columns by ``-(w_i - q_i) / [H⁻¹]_ii · [H⁻¹]_i,:``
(the OBS update, Eq. 3) compensates the error. The paper's Algorithm 1 uses the upper Cholesky
factor of ``H⁻¹`` for numerical stability and lazy batch updates over blocks of columns.
"""
from __future__ import annotations

import torch

from ...errors import LeanfmError
from .grid import QuantizedWeight, check_bits, grid_qparams, resolve_group_size


class HessianAccumulator:
    """Running ``H = (2 / n) Σ x xᵀ`` over calibration rows (the reference's ``add_batch``)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


def _quant_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, fractional: bool) -> torch.Tensor:
    if fractional:  # a float zero point (llama.cpp's Q4_1: value d*q + m): the nearest code of w/s + z
        return torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    rounding: str = "nearest",
) -> QuantizedWeight:
    """Quantize ``W [out, in]`` given the layer-input Hessian ``H [in, in]``.

    damp: fraction of the mean diagonal of H added to the diagonal (the paper's λ, default 1%).
    act_order: quantize columns in order of decreasing ``H_ii`` (the reference's "desc_act").
    With groups, the group grids are fixed up front from the original weight's contiguous
    groups ("static groups"), so the stored layout stays contiguous whatever the order.
    Without act_order, each group's grid is chosen when its first column is reached, from the
    already-updated weights, as in the reference implementation.
    rounding: how a group's grid is chosen (``grid.grid_qparams``): leanfm's range rule, or
    llama.cpp's block rule (``llama.cpp``; groups of 32), whose codes then fit that GGUF type.
    """
    check_bits(bits)
    threads = torch.get_num_threads()
    try:
        return _gptq(W, H, bits, group_size, symmetric, damp, block_size, act_order, rounding, threads)
    finally:
        torch.set_num_threads(threads)


def _gptq(W, H, bits, group_size, symmetric, damp, block_size, act_order, rounding, threads: int = 1) -> QuantizedWeight:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise LeanfmError(f"GPTQ needs W [out, in] and H [in, in]; got {tuple(W.shape)} and {tuple(H.shape)}")
    if not 0 <= damp < 1:
        raise LeanfmError(f"damp={damp} must be in [0, 1)")
    rows, cols = W.shape
    gs = resolve_group_size(cols, group_size)
    maxq = 2**bits - 1
    W = W.detach().float().clone()
    H = H.detach().float()  # the caller's (it may serve several linears with one input): copied below, never changed
    # Weights that are exactly zero (pruned by an earlier step) stay zero: their code is the
    # zero point (0 is on every integer grid), and the error of pinning them is compensated by
    # the free weights, as in SparseGPT's fixed-mask OBS update (Frantar & Alistarh, 2023).
    pruned = W == 0

    diag = torch.diag(H).clone()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0

    n_groups = cols // gs
    static = act_order or gs == cols
    if static:
        scale_g, zero_g = grid_qparams(W, bits, gs, symmetric, rounding)
    else:
        scale_g = torch.zeros(rows, n_groups)
        zero_g = torch.zeros(rows, n_groups)

    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    # one working copy of H at a time (a 11008-wide Hessian is 0.48 GB): permuted, or cloned
    H = H[perm][:, perm] if act_order else H.clone()
    H.diagonal()[dead[perm]] = 1.0
    pruned = pruned[:, perm]
    any_pruned = bool(pruned.any())

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise LeanfmError(f"GPTQ Hessian is not positive definite ({e}); raise damp or use more calibration data") from None

    fractional = rounding == "llama.cpp" and not symmetric
    group_of = perm // gs  # group of each (permuted) column in the original layout
    codes_t = torch.zeros(cols, rows, dtype=torch.uint8)  # one row per column: written whole
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # the block transposed, so that column i of W is the contiguous row W1[i] and the OBS
        # update of the remaining columns is a rank-1 update of contiguous rows (4x faster here
        # than on the strided columns of W)
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # the columns: hundreds of tiny ops, where thread wake-ups cost more than they save; the
        # factorizations above and the block update below are large and keep every thread
        torch.set_num_threads(1)
        for i in range(i2 - i1):
            c = i1 + i
            g = int(group_of[c])
            if not static and c % gs == 0:
                # grid for this group from the (already error-compensated) columns c..c+gs
                block = torch.cat([W1[i:].t(), W[:, i2 : i2 + gs]], dim=1)[:, :gs]
                s, z = grid_qparams(block, bits, gs, symmetric, rounding)
                scale_g[:, g], zero_g[:, g] = s[:, 0], z[:, 0]
            w = W1[i]
            d = Hinv1[i, i]
            q = _quant_col(w, scale_g[:, g], zero_g[:, g], maxq, fractional)
            if any_pruned:  # (with a fractional zero point: its nearest code)
                q = torch.where(pruned[:, c], torch.round(zero_g[:, g]).clamp(0, maxq), q)
            codes_t[c] = q.to(torch.uint8)
            dq = scale_g[:, g] * (q - zero_g[:, g])
            err = (w - dq) / d
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)  # W[:, j] -= err * Hinv[i, j] for j >= i, in place
            Err1[i] = err
        torch.set_num_threads(threads)
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return QuantizedWeight(codes_t[inv].t().contiguous(), scale_g, zero_g, bits, gs)
