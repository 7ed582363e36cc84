"""Execution backends for packed integer weights: one storage layout + one forward each.

The algorithm that chose a layer's codes (RTN, GPTQ, AWQ, HQQ) hands over a
:class:`~leanfm.formats.quantized.QuantizedWeight`; a backend packs it into the tensors its
kernel reads, runs the forward, and unpacks it back exactly (for checkpoints and export).

- ``reference``: portable nibble/int8 storage; every call dequantizes to fp32 and runs a dense
  GEMM. Correct everywhere, the yardstick for the others, not fast.
- ``tinygemm-int4``: ``aten._weight_int4pack_mm_for_cpu`` (the CPU port of the tinygemm int4
  kernel that torchao's int4 weight-only path uses). It reads bf16 activations and bf16
  scale/zero, so its outputs differ from the fp32 reference by bf16 rounding. Used for small
  token counts (decode); for prefill (more than ``DECODE_MAX_TOKENS`` rows) the packed codes are
  dequantized to fp32 and multiplied densely, which is faster on this CPU.
- ``int8pack``: ``aten._weight_int8pack_mm`` (int8 per-channel symmetric weights, bf16
  activations), same decode/prefill split.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LeanfmError
from ..formats.layout import AUTO_ORDER, ROW_LOCAL, Layout, kernel_group, layout_unsupported
from ..formats.quantized import QuantizedWeight, dequantize, grouped
from . import cpp_int4, packing

DECODE_MAX_TOKENS = 16
DENSE_CHUNK = 1 << 23  # weights dequantized at once on the dense path (32 MiB of fp32)
_ws = threading.local()


def _workspace(n: int) -> torch.Tensor:
    """This thread's fp32 dequantization buffer, at least ``n`` elements (kept for reuse)."""
    buf = getattr(_ws, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _ws.buf = torch.empty(n)
    return buf[:n]


class Backend:
    name = ""
    kernel = ""
    act_dtype = torch.bfloat16  # what the decode kernel reads
    rows_first = True  # every packed buffer has the output rows in dim 0 (slicing rows is a view)
    decode_op = None  # the pure torch operator of the decode kernel (merged across a fused group in compiled graphs)

    def unsupported(self, lay: Layout, symmetric: bool) -> str | None:
        """Why this backend cannot run the layout (None when it can): the shape rules of
        ``formats/layout.py``; a backend adds its own availability check."""
        return layout_unsupported(self.name, lay, symmetric)

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def codes(self, bufs: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, bufs: dict[str, torch.Tensor], lay: Layout) -> QuantizedWeight:
        return QuantizedWeight(self.codes(bufs, lay), bufs["scale"].float(), bufs["zero"].float(), lay.bits, lay.group_size)

    def dequantize(self, bufs: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        return dequantize(self.codes(bufs, lay), bufs["scale"], bufs["zero"].float(), lay.group_size)

    def forward(self, x: torch.Tensor, bufs: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        """Dequantize to fp32 and multiply densely.

        A backend whose buffers all keep output rows in dim 0 (``rows_first``) does it
        ``DENSE_CHUNK`` weights at a time into one reused fp32 workspace, so a large layer costs
        neither a large transient nor fresh pages per call: whole, a 7B model's fused gate/up
        (22016 x 4096) took ~1.5 GB of dequantize temporaries at once, and freed temporaries of
        that size either fragment the heap or, with glibc's mmap threshold pinned, are faulted in
        anew on every call (two 512-token windows of the 7B: 225 s vs 116 s). Same operations, same numbers."""
        step = max(1, DENSE_CHUNK // lay.in_features)
        if not self.rows_first or lay.out_features <= step:
            return F.linear(x, self.dequantize(bufs, lay).to(x.dtype))
        grad = torch.is_grad_enabled() and x.requires_grad  # autograd keeps each chunk: no reuse
        out = x.new_empty(*x.shape[:-1], lay.out_features)
        for start in range(0, lay.out_features, step):
            rows = {k: v[start: start + step] for k, v in bufs.items()}  # views: no copy
            if grad:
                w = self.dequantize(rows, lay)
            else:
                r = rows["scale"].shape[0]
                w = _workspace(r * lay.in_features).view(r, lay.in_features)
                w.copy_(self.codes(rows, lay))
                # formats.quantized.dequantize's s * (q - z), in place
                grouped(w, lay.group_size).sub_(rows["zero"].float().unsqueeze(-1)).mul_(rows["scale"].unsqueeze(-1))
            out[..., start: start + step] = F.linear(x, w.to(x.dtype))
        return out

    def _decode_kernel(self, x2: torch.Tensor, bufs: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        raise NotImplementedError

    def _split_forward(self, x: torch.Tensor, bufs: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        """The packed kernel for decode-sized inputs, dequant + dense GEMM above DECODE_MAX_TOKENS rows."""
        rows = x.numel() // lay.in_features
        if rows > DECODE_MAX_TOKENS:
            return Backend.forward(self, x, bufs, lay)
        x2 = x.reshape(rows, lay.in_features)
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        y = self._decode_kernel(x2, bufs, lay)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*x.shape[:-1], lay.out_features)


def canonical(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """fp32 scales; integer zero points as uint8, fractional ones (HQQ) as fp32."""
    z = qw.zero.float()
    integral = bool(torch.equal(z, z.round())) and float(z.min()) >= 0 and float(z.max()) <= 255
    return {"scale": qw.scale.float().contiguous(), "zero": (z.to(torch.uint8) if integral else z).contiguous()}


class Reference(Backend):
    name = "reference"
    kernel = "reference dequant + dense fp32 GEMM"

    def pack(self, qw):
        return {"qweight": packing.pack_codes(qw.codes, qw.bits), **canonical(qw)}

    def codes(self, bufs, lay):
        return packing.unpack_codes(bufs["qweight"], lay.bits)


class TinyGemmInt4(Backend):
    name = "tinygemm-int4"
    kernel = "aten._weight_int4pack_mm_for_cpu (tinygemm int4, bf16 activations) for decode; dequant + fp32 GEMM for prefill"


    rows_first = False  # tiled: rows are interleaved in aten's int4 pack

    def pack(self, qw):
        lay = Layout(qw.bits, qw.group_size, qw.codes.shape[1], qw.codes.shape[0])
        kg = kernel_group(lay)
        rep = qw.group_size // kg
        scale = qw.scale.float().repeat_interleave(rep, dim=1)  # [N, K/kg]
        zero = qw.zero.float().repeat_interleave(rep, dim=1)
        # Kernel computes (q - 8) * s + z'; ours is (q - z) * s, so z' = (8 - z) * s.
        sz = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        return {"qweight": packing.pack_int4_aten(qw.codes), "scale_zero_bf16": sz, **canonical(qw)}

    def codes(self, bufs, lay):
        return packing.unpack_int4_aten(bufs["qweight"])

    forward = Backend._split_forward
    decode_op = torch.ops.aten._weight_int4pack_mm_for_cpu.default

    def _decode_kernel(self, x2, bufs, lay):
        kg = lay.in_features // bufs["scale_zero_bf16"].shape[0]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, bufs["qweight"], kg, bufs["scale_zero_bf16"])


class Int8Pack(Backend):
    name = "int8pack"
    kernel = "aten._weight_int8pack_mm (int8 weight-only, bf16 activations) for decode; dequant + fp32 GEMM for prefill"


    def pack(self, qw):
        return {"qweight": packing.pack_int8(qw.codes), "scale_bf16": qw.scale[:, 0].to(torch.bfloat16), **canonical(qw)}

    def codes(self, bufs, lay):
        return packing.unpack_int8(bufs["qweight"])

    forward = Backend._split_forward
    decode_op = torch.ops.aten._weight_int8pack_mm.default

    def _decode_kernel(self, x2, bufs, lay):
        return torch.ops.aten._weight_int8pack_mm(x2, bufs["qweight"], bufs["scale_bf16"])


class CppInt4(Backend):
    name = "cpp-int4"
    kernel = "leanfm C++ int4 GEMV (AVX2, fp32 activations) for decode; dequant + fp32 GEMM for prefill"
    act_dtype = torch.float32

    def unsupported(self, lay, symmetric):
        why = super().unsupported(lay, symmetric)
        if why:
            return why
        op = cpp_int4.load()
        return f"{self.name} is unavailable here: {op}" if isinstance(op, str) else None

    def pack(self, qw):
        return {"qweight": cpp_int4.pack(qw.codes, qw.group_size), "minus_sz": (-qw.scale * qw.zero).float().contiguous(), **canonical(qw)}

    def codes(self, bufs, lay):
        return cpp_int4.unpack(bufs["qweight"], lay.group_size)

    forward = Backend._split_forward
    decode_op = torch.ops.leanfm.int4_gemv.default

    def _decode_kernel(self, x2, bufs, lay):
        # eagerly the pybind function; a traced graph calls the operator it implements (loaded by
        # ``unsupported`` when the backend was chosen)
        fn = torch.ops.leanfm.int4_gemv.default if torch.compiler.is_compiling() else cpp_int4.load()
        return fn(x2, bufs["qweight"], bufs["scale"], bufs["minus_sz"], lay.group_size)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Reference(), CppInt4(), TinyGemmInt4(), Int8Pack())}


def decode_ops() -> list:
    """Every backend's decode operator (for :class:`.graph_cse.DedupePackedCalls`)."""
    return [b.decode_op for b in BACKENDS.values() if b.decode_op is not None]


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise LeanfmError(f"unknown kernel backend '{name}'; known: {', '.join(sorted(BACKENDS))}, auto, fake")
    return BACKENDS[name]


def auto(lay: Layout, symmetric: bool, row_local: bool = False) -> Backend:
    """Fastest backend that runs the layout on this machine (reference as the fallback);
    ``row_local``: only those whose buffers keep each row whole (an embedding table's lookup)."""
    for name in AUTO_ORDER:
        if (name in ROW_LOCAL or not row_local) and BACKENDS[name].unsupported(lay, symmetric) is None:
            return BACKENDS[name]
    return BACKENDS["reference"]
