"""Bit packing of integer weight codes (pure tensor functions, exact round trips).

Codes of up to 4 bits are stored two per byte ("nibbles"): column ``2j`` in the low nibble and
column ``2j + 1`` in the high nibble of byte ``j`` of the row. 3-bit codes use the same 4-bit
storage (honestly: 0.5 byte per weight, not 0.375). Codes of 5..8 bits are one byte each, stored
as ``int8`` after subtracting 128 so an 8-bit symmetric grid (zero point 128) becomes the usual
signed int8 weight with zero point 0.
"""
from __future__ import annotations

import torch

from ..errors import LeanfmError
from .layout import storage_bits  # noqa: F401  (re-exported: packing.storage_bits)




def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [rows, cols]`` codes in 0..15 -> ``uint8 [rows, cols // 2]`` nibbles."""
    if codes.shape[-1] % 2:
        raise LeanfmError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    if int(c.max()) > 15:
        raise LeanfmError("int4 packing got a code above 15")
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [rows, cols // 2]`` -> ``uint8 [rows, cols]``."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# The layout of aten._convert_weight_to_int4pack_for_cpu (the CPU "tinygemm" int4 kernel):
# rows in blocks of 32; within a block, for each column k, 16 bytes whose byte i holds row i of
# the block in the low nibble and row i + 16 in the high nibble. Verified against aten in tests.
_TILE_N = 32


def pack_int4_tiled(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [rows, cols]`` codes in 0..15 -> ``uint8 [rows, cols // 2]`` in the CPU int4 kernel layout."""
    n, k = codes.shape
    if n % _TILE_N:
        raise LeanfmError(f"the int4 CPU kernel layout needs rows divisible by {_TILE_N}, got {n}")
    c = codes.to(torch.uint8).reshape(n // _TILE_N, 2, _TILE_N // 2, k)
    byte = c[:, 0] | (c[:, 1] << 4)  # [blocks, 16, k]
    return byte.permute(0, 2, 1).contiguous().reshape(n, k // 2)


def unpack_int4_tiled(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_tiled`."""
    n, half_k = packed.shape
    k = half_k * 2
    byte = packed.reshape(n // _TILE_N, k, _TILE_N // 2).permute(0, 2, 1)  # [blocks, 16, k]
    return torch.stack([byte & 0x0F, byte >> 4], dim=1).reshape(n, k)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """``uint8`` codes in 0..255 -> ``int8`` (code - 128)."""
    return (codes.to(torch.int16) - 128).to(torch.int8)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    return (packed.to(torch.int16) + 128).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(codes) if storage_bits(bits) == 4 else pack_int8(codes)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(packed) if storage_bits(bits) == 4 else unpack_int8(packed)
