"""Bit packing of integer weight codes (pure tensor functions, exact round trips).

Codes of up to 4 bits are stored two per byte ("nibbles"): column ``2j`` in the low nibble and
column ``2j + 1`` in the high nibble of byte ``j`` of the row. 3-bit codes use the same 4-bit
storage (honestly: 0.5 byte per weight, not 0.375). Codes of 5..8 bits are one byte each, stored
as ``int8`` after subtracting 128 so an 8-bit symmetric grid (zero point 128) becomes the usual
signed int8 weight with zero point 0.
"""
from __future__ import annotations

import functools

import torch

from ..errors import LeanfmError
from ..formats.layout import storage_bits  # noqa: F401  (re-exported: packing.storage_bits)




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


# The CPU int4 kernel (aten._weight_int4pack_mm_for_cpu, "tinygemm") reads codes in a tiled layout
# that aten's own packer writes, and that layout depends on the ISA torch dispatched to at run time
# (AVX2, AVX-512 and the portable DEFAULT path each tile differently; ATEN_CPU_CAPABILITY picks one).
# So we never reproduce it: packing calls aten's packer, and unpacking learns where each code went by
# packing index digits through that same packer (the packer only moves nibbles, so the layout is a
# permutation of the rows x cols codes, recovered exactly with ceil(log16(rows*cols)) probe packs).


def pack_int4_aten(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [rows, cols]`` codes in 0..15 -> ``uint8 [rows, cols // 2]`` in the layout the running
    torch's CPU int4 kernel reads (aten's own packer, for the ISA dispatched now)."""
    if codes.shape[-1] % 2:
        raise LeanfmError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=16)
def aten_int4_sources(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of aten's packed ``[rows, cols // 2]`` bytes (low nibble first, row-major),
    the flat index ``r * cols + c`` of the code it holds, found by packing the index's base-16
    digits one at a time. Cached per shape: the probe packs cost 0.04-0.45 s for a 1536 x 576
    layer, and the ISA aten dispatches to is fixed for the life of the process."""
    n = rows * cols
    dtype = torch.int32 if n < 2**31 else torch.int64
    idx = torch.arange(n, dtype=dtype)
    src = torch.zeros(n, dtype=dtype)
    for d in range(max(1, -(-(n - 1).bit_length() // 4))):
        digit = ((idx >> (4 * d)) & 15).view(rows, cols).to(torch.int32)
        src |= unpack_int4(pack_int4_aten(digit)).reshape(-1).to(dtype) << (4 * d)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[src.long()] = True
    if not bool(seen.all()):
        raise LeanfmError("aten's int4 packer did not permute the codes on this torch/CPU; "
                          "use backend cpp-int4 or reference instead of tinygemm-int4")
    return src.long()


def unpack_int4_aten(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_aten` (exact, for the ISA the codes were packed under)."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(rows * cols, dtype=torch.uint8)
    out[aten_int4_sources(rows, cols)] = unpack_int4(packed).reshape(-1)
    return out.view(rows, cols)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """``uint8`` codes in 0..255 -> ``int8`` (code - 128)."""
    return (codes.to(torch.int16) - 128).to(torch.int8)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    return (packed.to(torch.int16) + 128).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(codes) if storage_bits(bits) == 4 else pack_int8(codes)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(packed) if storage_bits(bits) == 4 else unpack_int8(packed)
