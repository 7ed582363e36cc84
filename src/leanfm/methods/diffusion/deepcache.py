"""DeepCache on an ONNX UNet (Ma et al., CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free").

Between adjacent denoising steps a UNet's deep, low-resolution features change little; its
shallow, full-resolution path is what turns them into this step's output. DeepCache runs the
whole UNet on a step, keeps the feature the last upsampling reads (the deep branch's result, at
half the output resolution), and on the next steps runs only the shallow path: the first
full-resolution down blocks (for their skip connections), the last up block fed the cached
feature, and the output head.

On an ONNX graph both halves are subgraphs of the original, so nothing is re-implemented: the
*full* model is the graph with the cached tensor added as a second output; the *shallow* model
is what :class:`onnx.utils.Extractor` keeps when that tensor becomes an input (every node that
only fed it drops out). The default cache point is the first input of the graph's last
``Resize`` node (in a UNet's decoder, the upsampling into the full-resolution level).
"""
from __future__ import annotations

import numpy as np

from ...errors import LeanfmError


def cache_point(proto) -> str:
    """The tensor the graph's last ``Resize`` (upsampling) node reads."""
    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    if not resizes:
        raise LeanfmError("DeepCache needs a UNet whose decoder upsamples (an ONNX Resize node); this graph has none")
    return resizes[-1].input[0]


def split(proto, tensor: str | None = None):
    """``(full, shallow, tensor)``: the graph with ``tensor`` as an extra output, and the subgraph
    that computes the original output from the original inputs plus ``tensor``."""
    import onnx
    from onnx import helper
    from onnx.utils import Extractor

    tensor = tensor or cache_point(proto)
    produced = {o for n in proto.graph.node for o in n.output}
    if tensor not in produced:
        raise LeanfmError(f"DeepCache: no node of the graph produces '{tensor}'")
    full = onnx.ModelProto()
    full.CopyFrom(proto)
    full.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    ext = Extractor(onnx.shape_inference.infer_shapes(proto))  # types the cached tensor where it can
    if tensor not in ext.value_infos:  # shape inference left it untyped: declare it
        ext.value_infos[tensor] = helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
    inputs = [i.name for i in proto.graph.input] + [tensor]
    shallow = ext.extract_model(inputs, [o.name for o in proto.graph.output])
    kept = {n.name for n in shallow.graph.node}
    if len(kept) >= len(proto.graph.node):
        raise LeanfmError(f"DeepCache: caching '{tensor}' removes no node of the graph; choose a deeper tensor")
    return full, shallow, tensor


class CachedDenoiser:
    """A ``denoise(x, sigma, cond)`` that runs ``full`` (returning the output and the cached
    feature) every ``interval`` calls and ``shallow`` with the last cached feature in between;
    ``reset()`` before each new batch of samples. ``full_calls``/``shallow_calls`` count both."""

    def __init__(self, full, shallow, tensor: str, interval: int = 2):
        if not isinstance(interval, int) or interval < 1:
            raise LeanfmError(f"DeepCache interval={interval!r} must be a whole number >= 1 (1 = never reuse)")
        self.full, self.shallow, self.tensor, self.interval = full, shallow, tensor, interval
        self.full_calls = self.shallow_calls = 0
        self.reset()

    def reset(self) -> None:
        self._k, self._cache = 0, None

    def __call__(self, x: np.ndarray, sigma: np.ndarray, cond: np.ndarray) -> np.ndarray:
        if self._k % self.interval == 0 or self._cache is None or self._cache.shape[0] != x.shape[0]:
            out, self._cache = self.full(x, sigma, cond)
            self.full_calls += 1
        else:
            out = self.shallow(x, sigma, cond, **{self.tensor: self._cache})
            self.shallow_calls += 1
        self._k += 1
        return out
