"""Weight formats on a target: which kernel runs a matmul, how many bytes it stores and reads.

For each matmul (:class:`~.recipe_effects.Piece`) the format is picked from what the recipe did
to it (``w4a16``, ``w8a16``, ``w8a8``, ``2:4-sparse``, ``unstructured-sparse``, or the target's
dense dtype) and looked up in ``hardware/kernels.yaml`` through
:func:`leanfm.predict.hardware.kernel_info`. No kernel there, masked sparsity, or fake
quantization means *simulated*: the dense weight is stored and read at the target's dense dtype,
with the full FLOPs, so the prediction shows no speedup.

Stored bytes of packed weights:

- on CPUs (where leanfm's own ``QuantLinear`` runs) exactly what its backend holds
  (``kernels/backends.py``): codes (two 4-bit codes per byte, or one int8), the canonical fp32
  scale and uint8 zero per (row, group) (fp32 zeros for HQQ's fractional ones), plus the
  backend's kernel copy: ``cpp-int4`` an fp32 ``-scale*zero`` per group, ``tinygemm-int4`` a bf16
  (scale, zero) pair per (row, kernel group), ``int8pack`` a bf16 scale per row; biases fp32;
- elsewhere the compressed-tensors ``pack-quantized`` layout that ``kernels/export_ct.py`` writes
  and GPU servers (vLLM) load: codes in int32 words, one 16-bit scale per (row, group), zero
  points (asymmetric only) packed ``bits`` wide along the output dimension, ``weight_shape``;
- sparse weights: kept values at the dense dtype plus ``index_bits_per_kept_weight`` from
  kernels.yaml (CSR's int32 column index), and CSR row pointers (int32, rows + 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..formats.layout import AUTO_ORDER, ROW_LOCAL, Layout, kernel_group, layout_unsupported, storage_bits
from .recipe_effects import Piece, QuantSpec

DTYPE_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass
class Format:
    """How one matmul runs on the target."""

    name: str  # format key (w4a16, bf16, ...)
    compute_dtype: str
    stored_bytes: float  # weight bytes held in memory
    read_bytes: float  # weight bytes one forward reads
    flops_factor: float = 1.0  # share of the dense FLOPs executed
    overhead: float = 0.0  # kernels.yaml dequant_overhead (fraction of roofline time)
    simulated: bool = False
    backend: str = ""
    note: str = ""
    wanted: str = ""  # the format the recipe asked for (differs from ``name`` when simulated)
    slower_than_dense: bool = False  # kernels.yaml faster_than_dense: false (a real kernel, measured slower)


def _groups(qs: QuantSpec, in_f: int) -> tuple[int, int]:
    g = qs.group_size or in_f
    return g, in_f // g


def _layout(qs: QuantSpec, in_f: int, out_f: int) -> Layout:
    return Layout(qs.bits, _groups(qs, in_f)[0], in_f, out_f)


def leanfm_backend(qs: QuantSpec, in_f: int, out_f: int, offered: list[str]) -> str:
    """The backend ``QuantLinear`` would pick (``backends.auto``: the same order and layout rules)
    among ``offered``."""
    if qs.backend not in ("auto", "fake"):
        return qs.backend
    lay, symmetric = _layout(qs, in_f, out_f), qs.symmetric and not qs.fractional_zero
    for name in AUTO_ORDER:
        if name in offered and (name in ROW_LOCAL or not qs.row_local) and layout_unsupported(name, lay, symmetric) is None:
            return name
    return "reference"


def leanfm_quant_bytes(qs: QuantSpec, in_f: int, out_f: int, backend: str, bias: bool = False) -> int:
    """Bytes a leanfm ``QuantLinear`` holds for this layout and backend (its buffers, exactly)."""
    g, ng = _groups(qs, in_f)
    codes = out_f * in_f * storage_bits(qs.bits) // 8
    canonical = out_f * ng * (4 + (4 if qs.fractional_zero else 1))  # fp32 scale + uint8 (or fp32) zero
    extra = {
        "cpp-int4": out_f * ng * 4,  # minus_sz fp32
        "tinygemm-int4": out_f * (in_f // (kernel_group(_layout(qs, in_f, out_f)) or g)) * 2 * 2,  # bf16 (scale, zero) pairs
        "int8pack": out_f * 2,  # bf16 per-row scale
    }.get(backend, 0)
    return codes + canonical + extra + (4 * out_f if bias else 0)


def export_quant_bytes(qs: QuantSpec, in_f: int, out_f: int, scale_bytes: float = 2.0, bias: bool = False) -> int:
    """Bytes of the compressed-tensors pack-quantized layout as a GPU server loads it."""
    _, ng = _groups(qs, in_f)
    b = storage_bits(qs.bits)
    codes = out_f * math.ceil(in_f * b / 32) * 4
    scales = out_f * ng * scale_bytes
    if qs.fractional_zero:
        zeros = out_f * ng * scale_bytes
    else:
        zeros = 0 if qs.symmetric else math.ceil(out_f * b / 32) * 4 * ng
    return int(codes + scales + zeros + 16 + (scale_bytes * out_f if bias else 0))  # + int64[2] weight_shape


def _dense(pc: Piece, base_bytes: float) -> float:
    return (pc.in_features * pc.out_features + (pc.out_features if pc.bias else 0)) * base_bytes


def _wanted(pc: Piece, kernels) -> list[str]:
    """Formats to try for a piece, best first."""
    q, s = pc.quant, pc.sparsity
    if q is not None and not q.simulated:
        w = "w4a16" if q.bits <= 4 else "w8a16"
        if q.act_bits is not None and q.bits <= 8 and q.act_bits <= 8:
            k = kernels("w8a8")
            if k is not None and k.get("faster_than_dense", True):
                return ["w8a8"]
        return [w]
    if s is not None and s.backend == "csr":
        return (["2:4-sparse"] if s.nm == (2, 4) else []) + ["unstructured-sparse"]
    return []


def resolve(pc: Piece, profile: dict, base_dtype: str, kernels) -> Format:
    """The :class:`Format` of ``pc`` on ``profile``; ``kernels(fmt)`` is ``kernel_info(fmt, profile)``."""
    base_bytes = DTYPE_BYTES[base_dtype]
    dense = _dense(pc, base_bytes)
    base_entry = kernels(base_dtype) or {}
    plain = Format(base_dtype, base_entry.get("compute_dtype", base_dtype), dense, dense,
                   overhead=float(base_entry.get("dequant_overhead", 0.0)), backend=",".join(base_entry.get("backends", [])[:1]))
    q, s = pc.quant, pc.sparsity
    if q is not None and q.simulated:
        plain.simulated, plain.wanted = True, f"w{q.bits} ({q.method}, fake-quant)"
        plain.note = f"{q.method} w{q.bits} is fake-quantized (dense weights): simulated, no speedup"
    elif s is not None and s.backend == "masked" and q is None:
        plain.simulated, plain.wanted = True, f"{s.pattern} sparsity (masked)"
        plain.note = f"{s.pattern} sparsity is masked (zeros in dense weights): simulated, no speedup"
    for fmt in _wanted(pc, kernels):
        entry = kernels(fmt)
        if entry is None:
            continue
        return _with_kernel(pc, fmt, entry, profile, base_dtype, q, s)
    wanted = _wanted(pc, kernels)
    if wanted:  # a real format the target has no kernel for
        plain.simulated, plain.wanted = True, wanted[0]
        plain.note = f"{wanted[0]} has no kernel on {profile['name']}: simulated, no speedup"
    return plain


def _with_kernel(pc: Piece, fmt: str, entry: dict, profile: dict, base_dtype: str, q, s) -> Format:
    base_bytes = DTYPE_BYTES[base_dtype]
    backends = list(entry.get("backends", []))
    out = Format(fmt, entry["compute_dtype"], 0.0, 0.0, overhead=float(entry.get("dequant_overhead", 0.0)),
                 backend=backends[0] if backends else "", note=str(entry.get("note", "")), wanted=fmt,
                 slower_than_dense=not entry.get("faster_than_dense", True))
    if fmt in ("w4a16", "w8a16", "w8a8"):
        if profile["kind"] == "cpu":
            be = leanfm_backend(q, pc.in_features, pc.out_features, backends)
            out.stored_bytes = float(leanfm_quant_bytes(q, pc.in_features, pc.out_features, be, pc.bias))
            out.backend = be
            if be == "reference":  # dequantizes the whole weight every call: no faster than dense
                out.simulated, out.note = True, "reference backend: dequantized per call, dense-speed (no kernel for this layout)"
                out.read_bytes, out.compute_dtype = _dense(pc, base_bytes), base_dtype
                return out
        else:
            out.stored_bytes = float(export_quant_bytes(q, pc.in_features, pc.out_features, bias=pc.bias))
        out.read_bytes = out.stored_bytes
        return out
    # sparse kernels: kept values at the dense dtype + index metadata (+ CSR row pointers)
    density = 1.0 - s.sparsity
    kept = round(pc.in_features * pc.out_features * density)
    index_bits = float(entry.get("index_bits_per_kept_weight", 0))
    crow = 4 * (pc.out_features + 1) if "csr" in backends else 0
    out.stored_bytes = out.read_bytes = kept * (base_bytes + index_bits / 8) + crow + (pc.out_features * base_bytes if pc.bias else 0)
    ff = entry.get("flops_factor", 1.0)
    out.flops_factor = density if ff == "density" else float(ff)
    return out
