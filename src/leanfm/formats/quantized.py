"""A quantized weight as integer codes on a uniform grid, and its dequantization.

A weight matrix ``W`` of shape ``[out, in]`` is split along ``in`` into groups of ``group_size``
columns; each (row, group) has a scale ``s`` and an integer zero point ``z``, and the
dequantized value of code ``q`` is ``s * (q - z)``. The quantizers that produce this record
live in ``methods/quantize`` (``grid.py``); the kernels that pack and run it in ``kernels/``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Integer codes plus per-(row, group) scale and zero point."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups]
    zero: torch.Tensor  # float32 [out, n_groups] (integer-valued)
    bits: int
    group_size: int  # columns per group (== in_features for per-channel)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` viewed as ``[out, in // group_size, group_size]``."""
    out, inf = w.shape
    return w.reshape(out, inf // group_size, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 weight ``s * (q - z)`` from codes and per-group parameters."""
    g = grouped(codes.float(), group_size)
    return ((g - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(codes.shape)
