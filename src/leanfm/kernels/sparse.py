"""Pruned weights on a real sparse kernel: ``SparseLinear`` stores CSR and runs torch's CSR matmul.

Masked pruning keeps a dense weight full of zeros (same bytes, same dense GEMM: simulated).
``SparseLinear`` stores only the non-zeros: values (fp32) plus int32 column indices and row
pointers, so at sparsity ``s`` a weight takes ``(1 - s) * 8`` bytes per element instead of 4 —
it only shrinks above 50% sparsity — and multiplies with ``torch.sparse.mm`` (MKL's CSR SpMM in
the PyPI CPU build). Whether that is faster than the dense GEMM is a measurement, not an
assumption: ``benchmarks/pruning.py`` reports it. There is no semi-structured (2:4) kernel on
CPU in torch (``to_sparse_semi_structured`` is CUDA only), so N:M patterns run as CSR too.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class SparseLinear(nn.Module):
    """``nn.Linear`` replacement holding its weight in CSR form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "CSR support is in beta": we test what we use
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().float().to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices().to(torch.int32))
        self.register_buffer("col", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def weight_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.in_features), check_invariants=False)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_csr().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr(), x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.nnz} ({1 - self.nnz / (self.in_features * self.out_features):.1%} sparse), CSR"


def to_sparse_(parent: nn.Module, child: str) -> SparseLinear:
    lin = getattr(parent, child)
    sp = SparseLinear(lin.weight, lin.bias)
    setattr(parent, child, sp)
    return sp
