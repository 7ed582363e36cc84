"""Uniform integer quantization grids: the pure tensor math shared by RTN (and later GPTQ/AWQ).

A weight matrix ``W`` of shape ``[out, in]`` is split along ``in`` into groups of ``group_size``
columns (``None`` = one group per output channel, "per-channel"). Each (row, group) gets a scale
``s`` and an integer zero point ``z``; codes are ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and
the dequantized value is ``s * (q - z)``.

Conventions follow the GPTQ reference quantizer (Frantar et al., 2023, and its code):
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` is mapped onto ``[0, 2^b - 1]``;
  ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``.
- symmetric: ``max = max|w|``, ``min = -max``, and ``z = 2^(b-1)`` (the grid's midpoint), so zero
  is exactly representable and only ``s`` needs storing.
An all-zero group gets the range [-1, 1] so its scale is never 0.
"""
from __future__ import annotations

import torch

from ...errors import LeanfmError
from ...formats.quantized import QuantizedWeight, dequantize, grouped  # noqa: F401 (re-exported: the record lives below the kernels)
from ...formats.gguf_blocks import llama_grid, llama_qparams
from .decl import block_type, check_bits  # noqa: F401 (check_bits re-exported: the torch-free check lives with the declarations)


def _suggest_divisors(n: int, g: int) -> str:
    """Nearest kernel-friendly divisors of ``n`` around ``g``: a power of two below, a multiple of 32 above."""
    below = [d for d in (2**k for k in range(3, 16)) if d < g and n % d == 0]
    above = [d for d in range(32, n + 1, 32) if d > g and n % d == 0]
    picks = ([below[-1]] if below else []) + ([above[0]] if above else [])
    return " or ".join(map(str, picks)) if picks else "null (per-channel)"


def resolve_group_size(in_features: int, group_size: int | None, layer: str = "weight") -> int:
    """Return the effective group size, or raise naming the layer and a valid divisor."""
    if group_size is None or group_size == -1:
        return in_features
    if group_size <= 0:
        raise LeanfmError(f"group_size={group_size} must be positive (or null for per-channel)")
    if in_features % group_size:
        raise LeanfmError(
            f"group_size {group_size} does not divide in_features {in_features} of layer {layer}; "
            f"use a divisor such as {_suggest_divisors(in_features, group_size)}"
        )
    return group_size


def choose_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per (row, group) for a 2-D weight; shapes ``[out, in // group_size]``."""
    g = grouped(w.float(), group_size)
    maxq = 2**bits - 1
    xmin = g.amin(dim=-1).clamp(max=0)
    xmax = g.amax(dim=-1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (uint8) of ``w`` on the given grid."""
    g = grouped(w.float(), group_size)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.uint8)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight (no calibration data)."""
    check_bits(bits)
    if w.dim() != 2:
        raise LeanfmError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    gs = resolve_group_size(w.shape[1], group_size)
    scale, zero = choose_qparams(w, bits, gs, symmetric)
    return QuantizedWeight(quantize(w, scale, zero, bits, gs), scale, zero, bits, gs)


def _llama_type(bits: int, group_size: int | None, symmetric: bool) -> str:
    qtype = block_type(bits, group_size, symmetric)
    if qtype is None:
        raise LeanfmError(f"rounding llama.cpp needs a llama.cpp block grid (4-bit or symmetric 8-bit groups of 32), "
                          f"got bits {bits}, group_size {group_size}, symmetric {symmetric}")
    return qtype


def grid_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  rounding: str = "nearest") -> QuantizedWeight:
    """Round-to-nearest on leanfm's grid (``nearest``) or llama.cpp's block grid (``llama.cpp``)."""
    if rounding == "llama.cpp":
        return llama_grid(w, _llama_type(bits, group_size, symmetric))
    return rtn_quantize(w, bits, group_size, symmetric)


def grid_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_qparams` for either rounding (llama.cpp's: fp16 scales, Q4_1's zero fractional)."""
    if rounding == "llama.cpp":
        return llama_qparams(w, _llama_type(bits, group_size, symmetric))
    return choose_qparams(w, bits, group_size, symmetric)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  rounding: str = "nearest") -> torch.Tensor:
    """``dequantize(grid_quantize(w))`` in the weight's dtype: the values a real kernel would use."""
    qw = grid_quantize(w, bits, group_size, symmetric, rounding)
    return dequantize(qw.codes, qw.scale, qw.zero, qw.group_size).to(w.dtype)
