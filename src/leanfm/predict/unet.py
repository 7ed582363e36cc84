"""The roofline predictor for a diffusion denoiser given as an ONNX graph (issue 19): ms per
denoising step and per sample.

The graph is the model here (``terrain-cm`` has no other form), so the cost is read off it:
ONNX shape inference with the inputs fixed to ``[batch, C, size, size]`` gives every tensor's
shape, and each node is priced on its own roofline, ``max(FLOPs / peak, bytes / bandwidth)``,
plus a fixed dispatch cost per node (the calibrated ``overhead_us_per_op``); a matmul or convolution
runs at the calibrated GEMM rate for its rows (``gemm_fp32_curve``) where there is one; the bandwidth is the
calibrated streaming read rate (``stream_read_gbps``) where there is one, else the profile's:

- FLOPs (multiply-adds count 2): ``Conv`` ``2 · N · C_out · H_out · W_out · (C_in / groups) · k_h · k_w``,
  ``ConvTranspose`` the same over its input positions, ``MatMul``/``Gemm`` ``2 · M · N · K``;
  elementwise and normalisation nodes ~1 per output value.
- bytes: every input and output tensor of the node once (fp32 activations, the weights at their
  stored width), i.e. no cache reuse across nodes, as in ``predict/analyzer.py`` for unfused
  elementwise ops.

A sample of ``steps`` consistency steps costs ``steps`` passes; with DeepCache every
``interval``-th pass is the full graph and the others its shallow half (priced the same way on
the subgraph). int8 weights that are folded to fp32 when the session loads (weight-only) cost what
fp32 costs; ONNX Runtime's integer kernels (w8a8) are not priced: the profile's int8 rate is
torch's, not ONNX Runtime's.
"""
from __future__ import annotations

import numpy as np

from ..errors import LeanfmError

_ITEM = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}  # ONNX elem_type -> bytes


def _shapes(proto, batch: int, size: int, channels: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every tensor's (shape, bytes per element) with the inputs fixed to ``batch`` samples."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    fixed = {0: [batch, channels, size, size]}
    for i, inp in enumerate(m.graph.input):
        dims = fixed.get(i, [batch])
        shape = inp.type.tensor_type.shape
        for d, v in zip(shape.dim, dims):
            d.ClearField("dim_param")
            d.dim_value = v
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # onnx raises its own InferenceError types
        raise LeanfmError(f"ONNX shape inference failed on the denoiser graph: {' '.join(str(e).split())[:160]}") from None
    out = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = (tuple(d.dim_value for d in t.shape.dim), _ITEM.get(t.elem_type, 4))
    for t in m.graph.initializer:
        out[t.name] = (tuple(t.dims), _ITEM.get(t.data_type, 4))
    return out


def _size(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == 2 else list(a.ints) if a.type == 7 else default
    return default


def node_costs(proto, batch: int, size: int, channels: int) -> list[dict]:
    """``[{"op", "flops", "bytes", "rows"}]`` for every node of ``proto`` at ``batch`` samples
    (``rows``: the ``M`` of a matmul or convolution taken as a GEMM, else None)."""
    shapes = _shapes(proto, batch, size, channels)
    costs = []
    for n in proto.graph.node:
        ins = [shapes.get(i) for i in n.input if i]
        outs = [shapes.get(o) for o in n.output if o]
        nbytes = sum(_size(t[0]) * t[1] for t in ins + outs if t is not None)
        out_n = sum(_size(t[0]) for t in outs if t is not None)
        flops, rows = float(out_n), None  # elementwise / normalisation: ~1 per output value
        if n.op_type == "Conv" and len(ins) > 1 and ins[1] is not None and outs and outs[0] is not None:
            # weight [C_out, C_in/g, kh, kw]: each output value is C_in/g * kh * kw multiply-adds
            flops = 2.0 * _size(outs[0][0]) * _size(ins[1][0][1:])
            rows = _size(outs[0][0]) // max(outs[0][0][1], 1)  # as a GEMM: one row per output position
        elif n.op_type == "ConvTranspose" and len(ins) > 1 and ins[1] is not None and ins[0] is not None:
            # weight [C_in, C_out/g, kh, kw]: each input value is spread over C_out/g * kh * kw outputs
            flops = 2.0 * _size(ins[0][0]) * _size(ins[1][0][1:])
            rows = _size(ins[0][0]) // max(ins[0][0][1], 1)
        elif n.op_type in ("MatMul", "Gemm") and len(ins) >= 2 and ins[0] is not None and outs and outs[0] is not None:
            a = ins[0][0]
            k = a[-1] if not (n.op_type == "Gemm" and _attr(n, "transA", 0)) else a[0]
            flops = 2.0 * _size(outs[0][0]) * k
            rows = outs[0][0][-2] if len(outs[0][0]) >= 2 else 1
        costs.append({"op": n.op_type, "flops": flops, "bytes": float(nbytes), "rows": rows,
                      "known": all(s is not None for s in ins + outs)})
    return costs


def price_ops(costs: list[dict], hardware: dict) -> dict:
    """Operators ``[{"flops", "bytes", "rows"}]`` each on its own roofline plus the dispatch cost,
    on ``hardware`` (a profile dict): ms, FLOPs, bytes, operators, the bound that dominates.

    A matmul or convolution with ``rows`` runs at the calibrated fp32 GEMM rate for that many
    rows (``gemm_fp32_curve``, capped at the peak) where the profile has one: a UNet's deep
    blocks multiply few rows (a 4×4 feature map is 16 per sample) and reach far less than the
    peak of a large GEMM. Without a curve, or for other operators, the peak. An operator with
    ``conv_weight_bytes`` (an eager torch convolution) adds those bytes at the calibrated
    ``conv_weight_gbps``: oneDNN re-lays the weights out on every eager call, before the
    arithmetic. ONNX Runtime does that once when the session loads, so graph nodes carry none."""
    from .curves import rate_for_rows
    from .hardware import peak_flops

    peak = peak_flops(hardware, "fp32")
    curve = rate_for_rows(hardware["gemm_fp32_curve"]) if hardware.get("gemm_fp32_curve") else None

    conv_bw = float(hardware.get("conv_weight_gbps") or 0.0) * 1e9

    def rate(c: dict) -> float:
        return min(peak, curve(c["rows"])) if curve is not None and c.get("rows") else peak

    def relayout(c: dict) -> float:
        return c.get("conv_weight_bytes", 0.0) / conv_bw if conv_bw else 0.0

    # a UNet step has no matrix-vector products: its bytes stream (activations, weights read once per
    # batch), so the streaming read rate applies where the machine was calibrated, not the GEMV one
    bw = float(hardware.get("stream_read_gbps") or hardware["memory_bandwidth_gbps"]) * 1e9
    per_op = float(hardware.get("overhead_us_per_op", 0.0)) * 1e-6
    compute = [c["flops"] / rate(c) for c in costs]
    s = sum(max(f, c["bytes"] / bw) + relayout(c) + per_op for f, c in zip(compute, costs))
    return {"ms": 1e3 * s, "flops": sum(c["flops"] for c in costs), "bytes": sum(c["bytes"] for c in costs),
            "nodes": len(costs), "bound": "compute" if sum(compute) > 0.5 * s else "memory"}


def graph_ms(proto, hardware: dict, batch: int, size: int, channels: int) -> dict:
    """One pass of the graph at ``batch`` samples on ``hardware`` (a profile dict): ms, FLOPs, bytes."""
    costs = node_costs(proto, batch, size, channels)
    return {**price_ops(costs, hardware), "nodes_unshaped": sum(not c["known"] for c in costs)}


def predict_denoiser(model, hardware: dict, batch: int, steps: int) -> dict:
    """``ms_per_sample`` and ``ms_per_step`` of a ``DenoiserModel`` as its methods left it (steps,
    DeepCache, int8), sampled ``batch`` at a time with ``steps`` steps (unless it sets its own)."""
    if any(n.op_type == "QuantizeLinear" for n in model.proto.graph.node):
        raise LeanfmError("the denoiser predictor does not price int8 activations (ONNX Runtime's integer kernels)")
    from ..methods.diffusion.int8_onnx import fold_weight_dequantize

    c = model.config
    proto = fold_weight_dequantize(model.proto)
    n = model.steps or steps
    full = graph_ms(proto, hardware, batch, c.size, c.channels)
    total, shallow = full["ms"] * n, None
    if model.cache_interval:
        from ..methods.diffusion.deepcache import split

        shallow = graph_ms(split(proto)[1], hardware, batch, c.size, c.channels)
        n_full = len(range(0, n, model.cache_interval))
        total = full["ms"] * n_full + shallow["ms"] * (n - n_full)
    return {"ms_per_sample": total / batch, "ms_per_step": total / batch / n, "flops_per_step": full["flops"] / batch,
            "bytes_per_step": full["bytes"] / batch, "bound": full["bound"], "nodes": full["nodes"],
            "nodes_unshaped": full["nodes_unshaped"], "shallow_ms_per_pass": shallow and shallow["ms"] / batch,
            "full_ms_per_pass": full["ms"] / batch, "batch": batch, "hardware": hardware.get("name")}
