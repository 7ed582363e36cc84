"""Pure low-rank math on one weight matrix ``W [out, in]``: ranks, and factors ``B [out, r]``,
``A [r, in]`` with ``W ≈ B A`` (the layer becomes ``x -> (x A^T) B^T``).

- :func:`truncated_svd`: Eckart–Young best rank-r approximation of W itself,
  W = U Σ V^T, B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_r^T (the square root is split evenly so both
  factors have similar scale).
- :func:`whitened_svd` (SVD-LLM, Wang et al. 2024, §3.1 "truncation-aware data whitening"):
  what matters is the layer's output on real inputs, ||(W - W') X^T||_F. With the Cholesky factor
  S of the (damped) input Gram matrix, X^T X = S S^T, that error equals ||(W - W') S||_F, so the
  optimal W' truncates the SVD of W S = U Σ V^T: W' = U_r Σ_r V_r^T S^{-1}, and each dropped
  singular value σ_i costs exactly σ_i of output error (SVD-LLM Theorem 3.2).
  B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_r^T S^{-1}.
- :func:`scaled_svd` (ASVD, Yuan et al. 2023, §3.2): the diagonal heuristic of the same idea,
  S = diag(mean_t |x_tj|)^α (paper: α = 0.5), W' = SVD_r(W S) S^{-1}.
At full rank every variant reproduces W (within fp32 rounding): factors are computed in float64.
"""
from __future__ import annotations

import torch

from ...errors import LeanfmError
from .rank import rank_for, saves_params  # noqa: F401  (re-exported)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root  # A [r, in] (before un-whitening), B [out, r]


def truncated_svd(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD factors ``(A [r, in], B [out, r])`` of ``w``."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a, b = _split(u, s, vh, r)
    return a.to(w.dtype), b.to(w.dtype)


def damped_cholesky(xtx: torch.Tensor, damp: float = 0.01, tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of ``xtx + λ I``, λ = damp x mean(diag) (x10 per failed try)."""
    h = xtx.double()
    scale = float(h.diagonal().mean()) if float(h.diagonal().mean()) > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    lam = damp * scale
    for _ in range(tries):
        s, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return s
        lam = max(lam * 10, 1e-8 * scale)
    raise LeanfmError("activation Gram matrix is not positive definite even with damping; raise damp")


def whitened_svd(w: torch.Tensor, xtx: torch.Tensor, r: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM factors of ``w`` for inputs with Gram matrix ``xtx = X^T X`` ``[in, in]``."""
    if xtx.shape != (w.shape[1], w.shape[1]):
        raise LeanfmError(f"X^T X must be [in, in] = [{w.shape[1]}, {w.shape[1]}], got {list(xtx.shape)}")
    s_chol = damped_cholesky(xtx, damp)
    u, s, vh = torch.linalg.svd(w.double() @ s_chol, full_matrices=False)
    a, b = _split(u, s, vh, r)
    a = torch.linalg.solve_triangular(s_chol, a, upper=False, left=False)  # A S^{-1}: solve A' S = A
    return a.to(w.dtype), b.to(w.dtype)


def scaled_svd(w: torch.Tensor, abs_mean: torch.Tensor, r: int, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD factors of ``w`` with column scales ``mean_t |x_tj| ** alpha``."""
    if abs_mean.shape != (w.shape[1],):
        raise LeanfmError(f"activation magnitudes must have in = {w.shape[1]} entries, got {list(abs_mean.shape)}")
    scale = abs_mean.double().pow(alpha)
    scale = scale.clamp_min(1e-6 * float(scale.max()) if float(scale.max()) > 0 else 1.0)
    u, s, vh = torch.linalg.svd(w.double() * scale, full_matrices=False)
    a, b = _split(u, s, vh, r)
    return (a / scale).to(w.dtype), b.to(w.dtype)


class ActStats:
    """Running input statistics of one linear layer: X^T X (for whitening) and sum |x| (for ASVD)."""

    def __init__(self, in_features: int, gram: bool = True, magnitude: bool = False):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if gram else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64) if magnitude else None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.xtx is not None:
            self.xtx += (x.t() @ x).double()
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0).double()
        self.n += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)
