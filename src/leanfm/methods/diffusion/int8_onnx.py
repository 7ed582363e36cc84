"""int8 for an ONNX denoiser: weight-only (int8 storage) and weights plus activations (ONNX
Runtime's static quantizer).

:func:`weight_only_int8` stores each Conv / Gemm / MatMul weight as int8 codes with one fp32
scale per output channel (symmetric, the largest magnitude to 127) behind a
``DequantizeLinear``; activations stay fp32. The file holds a quarter of the weight bytes; ONNX
Runtime folds the dequantization into fp32 weights when it loads the graph, so it computes in
fp32 at fp32 speed: a storage saving, not a compute one.

:func:`quantize_int8` (weights and activations):

``quantize_static`` rewrites the graph in QDQ form: each Conv / MatMul / Gemm weight becomes int8
codes with one fp32 scale per output channel (symmetric), and each such node's input a uint8
tensor with a scale and zero point fixed from calibration (min-max of the activations seen while
the denoiser runs on calibration inputs). ONNX Runtime then fuses each
``DequantizeLinear -> Conv -> QuantizeLinear`` group into an integer kernel (``QLinearConv``, u8s8
on x86), so the saving is real: a quarter of the weight bytes and integer arithmetic.

Calibration inputs should be what the sampler feeds the network: noisy samples at the noise
levels the steps use, with their conditions (:func:`calibration_feeds`).
"""
from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from ...errors import LeanfmError


def calibration_feeds(seeds: list[int], sigmas, cond_values, shape: tuple[int, ...], data_std: float) -> list[dict]:
    """One feed per (seed, step level): ``x = data_std * N(0, 1) + sigma * N(0, 1)``, the input a
    sampler hands the network at that level (a stand-in clean sample of the data's scale plus noise)."""
    feeds = []
    for s in seeds:
        rng = np.random.default_rng(10_000 + s)
        for sigma in sigmas:
            x = (data_std * rng.standard_normal((1, *shape)) + sigma * rng.standard_normal((1, *shape))).astype(np.float32)
            feeds.append({"noisy": x, "sigma": np.array([sigma], np.float32),
                          "difficulty": np.array([cond_values[s % len(cond_values)]], np.float32)})
    return feeds


WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def _weight_axis(node, w) -> int:
    """The output-channel axis of ``node``'s weight: 0 for Conv ([out, in, kh, kw]) and a Gemm
    with transB, else the last (a MatMul's or plain Gemm's [in, out])."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute):
        return 0
    return w.ndim - 1


def weight_only_int8(proto):
    """A copy of ``proto`` whose weight-bearing nodes read int8 per-channel codes through a
    ``DequantizeLinear`` (activations untouched); the number of weights converted."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    users: dict[str, int] = {}
    for n in out.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    new_nodes, done = [], 0
    for n in out.graph.node:
        name = n.input[1] if n.op_type in WEIGHT_OPS and len(n.input) > 1 else None
        if name in inits and users.get(name) == 1:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            if w.ndim >= 2:
                ax = _weight_axis(n, w)
                red = tuple(i for i in range(w.ndim) if i != ax)
                scale = np.abs(w).max(axis=red) / 127.0
                scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
                shape = [1] * w.ndim
                shape[ax] = -1
                q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
                inits[name].CopyFrom(numpy_helper.from_array(q, name + "_int8"))
                out.graph.initializer.extend([numpy_helper.from_array(scale, name + "_scale"),
                                              numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + "_zero")])
                new_nodes.append(helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"], [name],
                                                  axis=ax, name=name + "_dequantize"))
                done += 1
        new_nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out, done


def fold_weight_dequantize(proto):
    """``proto`` with every ``DequantizeLinear`` of a constant (an int8 weight and its scale) replaced
    by the fp32 weight it computes, when the graph quantizes no activation (no ``QuantizeLinear``):
    the int8 file of :func:`weight_only_int8`, run at fp32 speed. ONNX Runtime would otherwise
    dequantize the weights again on every call. A QDQ graph (int8 activations) is returned as is:
    its weight ``DequantizeLinear`` nodes are what ONNX Runtime fuses into integer kernels."""
    import onnx
    from onnx import numpy_helper

    if any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
        return proto
    inits = {t.name: t for t in proto.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep, folded, used = [], [], set()
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i):
            q, scale = (numpy_helper.to_array(inits[i]) for i in n.input[:2])
            zero = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.zeros_like(scale)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            w = (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.astype(np.float32).reshape(shape)
            folded.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
            used.update(i for i in n.input if i)
        else:
            keep.append(n)
    if not folded:
        return proto
    still = {i for n in keep for i in n.input}
    inits_kept = [t for t in out.graph.initializer if t.name not in used or t.name in still]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits_kept + folded)
    return out


def quantize_int8(model_bytes: bytes, feeds: list[dict], per_channel: bool = True, ops: tuple[str, ...] = WEIGHT_OPS) -> bytes:
    """The QDQ int8 graph of ``model_bytes`` calibrated on ``feeds`` (min-max). Only ``ops`` (the
    nodes that hold weights) are quantized: the elementwise rest of a denoiser includes its
    noise-level preconditioning (``c_skip x + c_out F``), whose range spans every noise level a
    sampler visits (inputs up to ~80 sigma), so one uint8 grid over it would erase the small-sigma
    steps; it stays fp32."""
    from ...runtimes.onnxrt import ort_module

    ort_module()  # one-line error naming the install command when ONNX Runtime is missing
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise LeanfmError("int8 quantization of the denoiser needs at least one calibration input")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="leanfm-int8-") as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs advice ("consider pre-processing") on the root logger
        try:
            quantize_static(src, dst, _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            op_types_to_quantize=list(ops), weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        finally:
            root.setLevel(level)
        with open(dst, "rb") as f:
            return f.read()
