"""Packed-weight layout rules as plain arithmetic (no torch): which backend can run a layout,
the group size the int4 kernels run, storage bits per code.

``kernels/backends.py`` (which runs the kernels) and the cost predictor (``predict/formats.py``,
which must not import torch) both read these, so a rule lives in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LeanfmError

BACKEND_NAMES = ("reference", "cpp-int4", "tinygemm-int4", "int8pack")  # backends.BACKENDS (a test keeps them equal)
AUTO_ORDER = ("cpp-int4", "tinygemm-int4", "int8pack")  # ``backends.auto``: fastest first, then reference
# backends whose buffers keep each weight row whole (row-major, one row per output), so an
# embedding lookup can gather rows of the packed table (tinygemm tiles rows together)
ROW_LOCAL = ("reference", "cpp-int4", "int8pack")
INT8PACK_K_MULTIPLE = 32


@dataclass(frozen=True)
class Layout:
    bits: int
    group_size: int
    in_features: int
    out_features: int


def storage_bits(bits: int) -> int:
    """Bits of storage per weight for a code width: 4 for 1..4 bits, 8 for 5..8."""
    if not 1 <= bits <= 8:
        raise LeanfmError(f"cannot pack {bits}-bit codes; packing supports 1 to 8 bits")
    return 4 if bits <= 4 else 8


def kernel_group(lay: Layout) -> int | None:
    """Group size the tinygemm int4 kernel runs: the layer's own, or a divisor with repeated scales."""
    for g in (256, 128, 64, 32):
        if lay.group_size % g == 0 and lay.in_features % g == 0:
            return lay.group_size if lay.group_size == g else g
    return None


def layout_unsupported(backend: str, lay: Layout, symmetric: bool) -> str | None:
    """Why ``backend`` cannot run the layout, from its shape alone (None when it can; whether the
    kernel is available on this machine is the backend's own check)."""
    if backend in ("cpp-int4", "tinygemm-int4") and lay.bits > 4:
        return f"{backend} runs codes of at most 4 bits, not {lay.bits}"
    if backend == "cpp-int4" and lay.group_size % 2:
        return f"{backend} needs an even group size, got {lay.group_size}"
    if backend == "tinygemm-int4":
        if lay.out_features % 32:
            return f"{backend} needs out_features divisible by 32, got {lay.out_features}"
        if kernel_group(lay) is None:
            return f"{backend} needs a group size that is a multiple of 32, got {lay.group_size}"
    if backend == "int8pack" and (lay.bits != 8 or lay.group_size != lay.in_features or not symmetric):
        return (f"{backend} runs 8-bit symmetric per-channel weights only (got {lay.bits} bits, group {lay.group_size}, "
                f"symmetric={symmetric})")
    if backend == "int8pack" and lay.in_features % INT8PACK_K_MULTIPLE:
        # aten._weight_int8pack_mm (torch 2.13, AVX2) returns inf/garbage for K = 4, 12, 20, 36, 145, 146, 148
        # and can crash the process; every multiple of 8 measured right. 32 leaves room for wider ISAs.
        return f"{backend} needs in_features divisible by {INT8PACK_K_MULTIPLE}, got {lay.in_features}"
    return None


def stored_weight_bytes(bits: int, group_size: int | None, in_features: int, out_features: int) -> int:
    """Bytes leanfm stores for one packed linear's weight, whatever backend runs it: the codes
    (:func:`storage_bits` per weight, so 2- and 3-bit codes take a nibble like 4-bit ones), an fp32
    scale and a uint8 zero point per (row, group) (symmetric grids store their zero too). These are
    the ``reference`` backend's buffers and the leanfm-quant checkpoint's tensors exactly; a fast
    backend adds its own kernel copy on top (``predict/formats.leanfm_quant_bytes``). No bias."""
    g = in_features if group_size in (None, -1) else int(group_size)
    if g <= 0 or in_features % g:
        raise LeanfmError(f"group_size {group_size} does not divide in_features {in_features}")
    codes = out_features * in_features * storage_bits(bits) // 8
    return codes + out_features * (in_features // g) * (4 + 1)
