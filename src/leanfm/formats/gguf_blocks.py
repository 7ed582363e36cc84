"""leanfm's integer grids as llama.cpp's block types (Q4_0, Q4_1, Q8_0), and llama.cpp's own
round-to-nearest grids for those types.

llama.cpp stores a weight row as blocks of 32 consecutive input columns (ggml-common.h):

- ``Q4_0``: ``{fp16 d; uint8 qs[16]}``, value ``d * (q - 8)``;
- ``Q4_1``: ``{fp16 d; fp16 m; uint8 qs[16]}``, value ``d * q + m``;
- ``Q8_0``: ``{fp16 d; int8 qs[32]}``, value ``d * q``.

In the 4-bit types byte ``j`` of ``qs`` holds code ``j`` in its low nibble and code ``j + 16`` in
its high nibble. leanfm's grid is ``s * (q - z)`` per group (``formats/quantized.py``), so a layer
maps onto a block type exactly when its groups are 32 columns and: 4-bit symmetric (``z = 8``)
-> Q4_0 with ``d = s``; 4-bit asymmetric -> Q4_1 with ``d = s``, ``m = -s * z``; 8-bit
symmetric (``z = 128``) -> Q8_0 with ``d = s`` and ``q - 128`` as int8. The only change is
that ``d`` and ``m`` are stored in fp16, as llama.cpp stores them.

:func:`llama_grid` reproduces llama.cpp's reference quantizers (``quantize_row_q4_0_ref`` etc. in
ggml-quants.c) as a :class:`QuantizedWeight`, so a leanfm recipe can ask for exactly the weights
llama.cpp's own quantization would produce (the baseline that GPTQ/AWQ codes in the same blocks
are compared with).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import LeanfmError
from .quantized import QuantizedWeight, grouped

BLOCK = 32
TYPES = ("q4_0", "q4_1", "q8_0")
_BITS = {"q4_0": 4, "q4_1": 4, "q8_0": 8}


def grid_problem(bits: int, group_size: int | None, symmetric: bool, qtype: str) -> str | None:
    """Why a grid of ``bits``/``group_size``/``symmetric`` cannot be stored as ``qtype`` blocks
    without requantizing (None when it can): the one table the writers and the runtime check use."""
    if qtype not in TYPES:
        return f"unknown GGUF block type '{qtype}'; use one of {', '.join(TYPES)}"
    if group_size != BLOCK:
        return f"its groups are {f'{group_size} columns' if group_size else 'whole rows'}, {qtype} blocks are {BLOCK} columns"
    if bits > _BITS[qtype]:
        return f"it has {bits}-bit codes, {qtype} holds {_BITS[qtype]}"
    if qtype in ("q4_0", "q8_0") and not symmetric:  # q4_1's m = -s*z takes any zero point
        return f"it is asymmetric; {qtype} needs symmetric codes (zero point {2 ** (bits - 1)})" + (
            ", use q4_1 for asymmetric 4-bit" if qtype == "q4_0" else "")
    return None


def fitting_types(bits: int, group_size: int | None, symmetric: bool) -> list[str]:
    """The block types a grid goes into unchanged."""
    return [t for t in TYPES if grid_problem(bits, group_size, symmetric, t) is None]


def fitting_step(qtype: str = "q4_0") -> str:
    """A recipe step whose grid fits ``qtype``, and the built-in recipes that fit, for error messages."""
    bits, sym = {"q4_0": (4, "true"), "q4_1": (4, "false"), "q8_0": (8, "true")}.get(qtype, (4, "true"))
    return (f"{{method: gptq, bits: {bits}, group_size: 32, symmetric: {sym}, rounding: llama.cpp}} "
            "(or rtn/awq with the same grid; recipes gptq-q4_0, awq-q4_1, rtn-q4_0)")


def fit_problem(qw: QuantizedWeight, qtype: str) -> str | None:
    """Why ``qw`` cannot be stored as ``qtype`` without requantizing (None when it can). A
    symmetric grid of fewer bits sits inside the type's: its codes are shifted, not rounded."""
    sym = bool((qw.zero.float() == 2 ** (qw.bits - 1)).all())
    return grid_problem(qw.bits, qw.group_size, sym, qtype)


def _fp16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def _nibbles(codes: torch.Tensor) -> np.ndarray:
    """``[rows, blocks, 32]`` codes in 0..15 -> ``[rows, blocks, 16]`` bytes (j | j+16 << 4)."""
    c = codes.to(torch.uint8)
    return (c[..., :16] | (c[..., 16:] << 4)).numpy()


def to_blocks(qw: QuantizedWeight, qtype: str, name: str = "the layer") -> np.ndarray:
    """``uint8 [rows, blocks * bytes_per_block]``: ``qw`` in ``qtype`` blocks, its own codes and
    scales (scales rounded to fp16). Raises LeanfmError naming ``name`` when the grid does not fit."""
    why = fit_problem(qw, qtype)
    if why:
        raise LeanfmError(f"{name} cannot be written as {qtype}: {why}")
    rows, cols = qw.codes.shape
    codes = grouped(qw.codes.to(torch.int16), BLOCK)  # [rows, blocks, 32]
    s = qw.scale.float()
    mid = 2 ** (qw.bits - 1)  # the symmetric zero point of leanfm's grid
    if qtype == "q4_0":  # d * (q - 8) with q = code - mid + 8
        parts = [_fp16(s), _nibbles(codes - mid + 8)]
    elif qtype == "q4_1":
        parts = [_fp16(s), _fp16(0.0 - s * qw.zero.float()), _nibbles(codes)]  # 0 - x: +0.0, not -0.0, for an all-zero block
    else:  # d * q with q = code - mid as int8
        parts = [_fp16(s), (codes - mid).to(torch.int8).numpy().view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _check(w: torch.Tensor, qtype: str) -> None:
    if qtype not in TYPES:
        raise LeanfmError(f"unknown GGUF block type '{qtype}'; use one of {', '.join(TYPES)}")
    if w.shape[-1] % BLOCK:
        raise LeanfmError(f"{qtype} needs rows whose length is a multiple of {BLOCK}, got {w.shape[-1]}")


def _block_d(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """llama.cpp's fp32 block scale ``d [rows, blocks, 1]`` for blocks ``x [rows, blocks, 32]``."""
    if qtype == "q4_0":  # the signed value of largest magnitude maps to code -8
        return x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -8
    if qtype == "q4_1":  # [min, max] onto 0..15
        return (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    return x.abs().amax(-1, keepdim=True) / 127  # q8_0


def llama_qparams(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[out, in // 32]`` of llama.cpp's block grid for ``w [out, in]``, as
    stored (``d`` and Q4_1's ``m`` rounded to fp16), for algorithms that choose their own codes
    on it (GPTQ, AWQ). A block whose scale would be 0 (all weights equal) gets scale 1: its
    values stay exactly representable."""
    _check(w, qtype)
    x = grouped(w.float(), BLOCK)
    d = _half(_block_d(x, qtype)).squeeze(-1)
    flat = d == 0
    d = torch.where(flat, torch.ones_like(d), d)
    if qtype == "q4_1":
        zero = -_half(x.amin(-1)) / d
    else:
        zero = torch.full_like(d, 8.0 if qtype == "q4_0" else 128.0)
    return d, zero


def llama_grid(w: torch.Tensor, qtype: str) -> QuantizedWeight:
    """llama.cpp's reference round-to-nearest for ``qtype`` on ``w [out, in]`` (``in`` a multiple
    of 32), as leanfm codes/scales/zeros whose dequantization equals llama.cpp's bit for bit."""
    _check(w, qtype)
    x = grouped(w.float(), BLOCK)
    d = _block_d(x, qtype)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    if qtype == "q4_0":  # q = min(15, trunc(x / d + 8.5))
        q = torch.clamp((x * inv + 8.5).trunc(), max=15)
        zero = torch.full_like(d, 8.0)
    elif qtype == "q4_1":  # m = min; q = min(15, trunc((x - min) / d + 0.5))
        lo = x.amin(-1, keepdim=True)
        q = torch.clamp(((x - lo) * inv + 0.5).trunc(), max=15)
        # value d*q + m is leanfm's s*(q - z) with z = -m/d (fractional in general, as HQQ's);
        # -s*z rounds back to fp16(m), so the blocks written are llama.cpp's.
        dh, mh = _half(d), _half(lo)
        zero = torch.where(dh != 0, -mh / dh, torch.zeros_like(dh))
        return QuantizedWeight(q.reshape(w.shape).to(torch.uint8), dh.squeeze(-1), zero.squeeze(-1), 4, BLOCK)
    else:  # q8_0: q = round(x / d) (half away from zero)
        v = x * inv
        q = torch.sign(v) * torch.floor(v.abs() + 0.5) + 128
        zero = torch.full_like(d, 128.0)
    return QuantizedWeight(q.reshape(w.shape).to(torch.uint8), _half(d).squeeze(-1), zero.squeeze(-1), _BITS[qtype], BLOCK)
