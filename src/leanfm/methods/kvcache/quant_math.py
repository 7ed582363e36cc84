"""Asymmetric min-max quantization of K/V tensors in groups (pure tensor functions).

A group is ``group_size`` consecutive elements along one axis: along the head dimension of one
token ("per-token" groups; ``group_size = head_dim`` gives one group per token and head) or along
the token axis of one channel ("per-channel", KIVI, Liu et al. 2024, Sec. 3). For a group with
minimum ``m`` and maximum ``M`` and ``b`` bits:

    scale = (M - m) / (2^b - 1),  code = clamp(round((x - m) / scale), 0, 2^b - 1),
    x_hat = code * scale + m,     so  |x - x_hat| <= scale / 2   (plus float rounding).

Codes are ``uint8``; 4-bit codes are packed two per byte along the last axis.
"""
from __future__ import annotations

import torch

_EPS = 1e-12  # floor of the scale of a constant group (its codes are then all 0, exact round trip)


def _grouped(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``x`` with ``axis`` moved last and split into ``[..., n_groups, group_size]``."""
    xt = x.movedim(axis, -1)
    length = xt.shape[-1]
    if length % group_size:
        raise ValueError(f"axis of length {length} is not divisible by group size {group_size}")
    return xt.reshape(*xt.shape[:-1], length // group_size, group_size)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1):
    """Return ``(codes uint8 shaped like x, scale, zero)``; scale/zero (float32) are shaped like
    ``x`` with ``axis`` shrunk to the number of groups."""
    g = _grouped(x.float(), group_size, axis)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    codes = torch.round((g - lo) / scale).clamp_(0, qmax).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:-2], -1).movedim(-1, axis)
    return codes, scale.squeeze(-1).movedim(-1, axis), lo.squeeze(-1).movedim(-1, axis)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, axis: int = -1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize` up to the rounding error: ``codes * scale + zero`` per group."""
    g = _grouped(codes, group_size, axis).float()
    x = g * scale.movedim(axis, -1)[..., None] + zero.movedim(axis, -1)[..., None]
    return x.reshape(*x.shape[:-2], -1).movedim(-1, axis).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 2k]`` codes in 0..15 -> ``uint8 [..., k]``: even index low nibble, odd high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
