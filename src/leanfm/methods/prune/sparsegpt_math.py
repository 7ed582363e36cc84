"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): pure tensor functions, no model code.

Layerwise problem (Eq. 1): find a mask ``M`` and weights ``Ŵ`` minimizing ``||W X - (M ⊙ Ŵ) X||²``
with ``H = 2 X Xᵀ`` (accumulated by :class:`~leanfm.methods.quantize.gptq_math.HessianAccumulator`).
Columns are processed left to right. Removing (or rounding) weight ``w_m`` of a row costs the
OBS error ``ε_m = w_m² / [H⁻¹]_mm`` and is compensated on the not-yet-processed columns by
``δ = -(w_m - q_m) / [H⁻¹]_mm · H⁻¹_{m,:}`` (Eq. 3, the Optimal Brain Surgeon update of Hassibi
& Stork). The inverses of the successively shrinking Hessians (§3.1, "Hessian synchronization")
are read off the rows of the upper Cholesky factor ``U`` of ``H⁻¹``: ``[H⁻¹]_mm`` at step ``m``
is ``U_mm²``. Updates are applied lazily per block of ``B`` columns (Algorithm 1), and the mask
of each block is chosen when the block is reached, from the already-updated weights (§3.2,
"Adaptive Mask Selection"); N:M masks are chosen per group of M columns (§3.3, "Extension to
Semi-Structured Sparsity"). In the joint mode ("Joint Sparsification & Quantization") every kept
weight is also rounded onto the quantization grid of :mod:`leanfm.methods.quantize.grid` as its
column is processed, so the OBS update compensates pruning and rounding errors together (the
GPTQ update).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LeanfmError
from ..quantize.grid import QuantizedWeight, check_bits, choose_qparams, resolve_group_size
from .masks import nm_mask, unstructured_mask


@dataclass
class SparseResult:
    """Pruned weight (float32, exact zeros where ``mask`` is False), keep-mask, and the
    quantized form (codes, scale, zero) in joint mode (``quant`` is None otherwise)."""

    weight: torch.Tensor
    mask: torch.Tensor
    quant: QuantizedWeight | None = None


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
) -> SparseResult:
    """Prune ``W [out, in]`` given the layer-input Hessian ``H [in, in]``.

    sparsity: fraction pruned in each block (unstructured; ignored when ``nm`` is given).
    nm: ``(N, M)`` keeps N of every M consecutive input weights per row (sparsity 1 - N/M).
    block_size: columns per lazy update and per mask choice (paper: 128); a multiple of M.
    damp: fraction of the mean Hessian diagonal added to the diagonal (paper: 1%).
    bits / group_size / symmetric: joint quantization of the kept weights (``bits=None``: off).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny per-column ops: thread wake-ups cost more than they save
    try:
        return _sparsegpt(W, H, sparsity, nm, block_size, damp, bits, group_size, symmetric)
    finally:
        torch.set_num_threads(threads)


def _check(W, H, sparsity, nm, block_size, damp, bits) -> None:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise LeanfmError(f"SparseGPT needs W [out, in] and H [in, in]; got {tuple(W.shape)} and {tuple(H.shape)}")
    if not 0 <= damp < 1:
        raise LeanfmError(f"damp={damp} must be in [0, 1)")
    if block_size < 1:
        raise LeanfmError(f"block_size={block_size} must be >= 1")
    if nm is None and not 0 <= sparsity < 1:
        raise LeanfmError(f"sparsity {sparsity} is outside [0, 1)")
    if nm is not None:
        n, m = nm
        if not 1 <= n < m or W.shape[1] % m or block_size % m:
            raise LeanfmError(f"N:M {n}:{m} needs 1 <= N < M and M dividing in_features ({W.shape[1]}) and block_size ({block_size})")
    if bits is not None:
        check_bits(bits)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # dampening λI, λ = damp · mean diag(H) (the reference code's percdamp)
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise LeanfmError(f"SparseGPT Hessian is not positive definite ({e}); raise damp or use more calibration data") from None


def _sparsegpt(W, H, sparsity, nm, block_size, damp, bits, group_size, symmetric) -> SparseResult:
    _check(W, H, sparsity, nm, block_size, damp, bits)
    rows, cols = W.shape
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _upper_cholesky_of_inverse(H, damp)

    keep = torch.ones(rows, cols, dtype=torch.bool)
    if bits is not None:
        gs = resolve_group_size(cols, group_size)
        maxq = 2**bits - 1
        scale = torch.zeros(rows, cols // gs)
        zero = torch.zeros(rows, cols // gs)
        codes = torch.zeros(rows, cols, dtype=torch.uint8)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            # adaptive mask selection: prune the block's weights with the lowest OBS error
            # ε = w² / [H⁻¹]_cc (Eq. 3), all rows of the block compared together
            keep1 = unstructured_mask(W1**2 / d1.unsqueeze(0) ** 2, sparsity, per_row=False)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            c = i1 + i
            if nm is not None and i % nm[1] == 0:
                # semi-structured: per row, keep the N of these M columns with the largest ε
                sl = slice(i, i + nm[1])
                keep1[:, sl] = nm_mask(W1[:, sl] ** 2 / d1[sl].unsqueeze(0) ** 2, *nm)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            if bits is not None:
                g = c // gs
                if c % gs == 0:  # grid of this group from its current (error-compensated) weights
                    block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    s, z = choose_qparams(block, bits, gs, symmetric)
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                code = torch.clamp(torch.round(q / scale[:, g]) + zero[:, g], 0, maxq)  # pruned: code = zero point, value 0
                codes[:, c] = code.to(torch.uint8)
                q = scale[:, g] * (code - zero[:, g])
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # OBS update, Eq. 3
            W1[:, i] = q  # equal to the update's result; set exactly so pruned weights are exact zeros
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the later columns (Algorithm 1)

    quant = QuantizedWeight(codes, scale, zero, bits, gs) if bits is not None else None
    return SparseResult(W, keep, quant)
