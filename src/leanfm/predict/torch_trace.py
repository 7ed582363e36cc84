"""Per-operator costs of a torch call, read off a trace that computes nothing (issue 19).

A diffusers pipeline's UNet, text encoder and VAE exist only as torch modules, so their cost is
read the way ``predict/unet.py`` reads an ONNX graph's: every operator the call dispatches,
with its FLOPs and the bytes it reads and writes, each then priced on its own roofline plus the
calibrated dispatch cost. The call runs under ``FakeTensorMode`` (tensors carry shapes and dtypes,
no data; the module's real weights are taken as fake ones), with a dispatch mode on top that
records each aten operator after autograd's decompositions (``linear`` arrives as ``t`` +
``addmm``), so the trace is the eager CPU path's operator sequence:

- FLOPs: torch's own counting rules (``torch.utils.flop_counter``: matmuls, convolutions,
  attention) where it has one; scaled-dot-product attention on the CPU ``4 · B · H · L · S · E``;
  anything else ~1 per output value.
- bytes: every tensor input and output once, at its dtype (no reuse across operators).
- rows: for a matmul or convolution, the ``M`` of the GEMM it is (output rows; a convolution's
  output positions), which ``price_ops`` reads the calibrated GEMM-rate curve at; a convolution
  also carries its weight bytes (``conv_weight_bytes``): eager torch hands them to oneDNN's
  layout on every call, priced at the calibrated ``conv_weight_gbps``.
- views (``view``, ``permute``, ``expand``...), metadata queries (``prim.device``) and factories (``zeros``, ``arange``: no tensor
  input, such as the call's own inputs being made) cost nothing and are not counted as operators.

Whatever the methods left in the modules is traced as it runs: a packed layer's kernel op, the
stubs DeepCache swaps in on a cached step, ToMe's merge and unmerge.
"""
from __future__ import annotations

import math

from ..errors import LeanfmError


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _gemm_rows(name: str, outs) -> int | None:
    """The rows ``M`` a matmul or convolution multiplies at once as a GEMM: a matrix product's
    output rows (per batch entry for ``bmm``), a convolution's output positions ``N · H · W``."""
    if not outs:
        return None
    shape = outs[0].shape
    if name.endswith(("mm", "addmm", "bmm", "baddbmm")) and len(shape) >= 2:
        return int(shape[-2])
    if "convolution" in name and len(shape) >= 3:
        return int(math.prod(shape) // shape[1])
    return None


def _attention_flops(args) -> float:
    q, k = args[0], args[1]
    b_h_l = math.prod(q.shape[:-1])
    return 4.0 * b_h_l * k.shape[-2] * q.shape[-1]


def trace_costs(*calls) -> list[list[dict]]:
    """Per call, ``[{"op", "flops", "bytes", "rows"[, "conv_weight_bytes"]}]`` of every operator it dispatches; the calls run one
    after the other in one fake-tensor session (a later call may read state an earlier one left,
    e.g. DeepCache's cached feature), each building its inputs inside (``torch.zeros``...).
    One-line error when an operator has no shape rule (a custom kernel)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    costs: list[dict] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if getattr(func, "is_view", False) or func.namespace == "prim" or func.overloadpacket in _FREE:
                return out
            name = str(func.overloadpacket)
            ins, outs = list(_tensors(args)) + list(_tensors(kwargs)), list(_tensors(out))
            if not ins:  # a factory (zeros, arange...): the call's inputs being made, not the model's work
                return out
            nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
            rows = None
            if func.overloadpacket in flop_registry:
                flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
                rows = _gemm_rows(name, outs)
            elif "scaled_dot_product" in name and len(args) >= 2:
                flops = _attention_flops(args)
            else:
                flops = float(sum(t.numel() for t in outs))
            cost = {"op": name, "flops": flops, "bytes": float(nbytes), "rows": rows}
            if "convolution" in name and len(args) > 1 and isinstance(args[1], torch.Tensor):
                cost["conv_weight_bytes"] = float(args[1].numel() * args[1].element_size())
            costs.append(cost)
            return out

    per_call = []
    try:
        with torch.inference_mode(False), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), Recorder():
            for call in calls:
                call()
                per_call.append(costs[:])
                costs.clear()
    except LeanfmError:
        raise
    except Exception as e:  # an operator without a fake (shape) implementation, e.g. a custom C++ kernel
        raise LeanfmError(f"cannot trace the model's operators for the roofline ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]})") from None
    return per_call


def _free_ops() -> set:
    import torch

    a = torch.ops.aten
    return {a.detach, a.alias, a.lift_fresh, a.empty, a.empty_strided, a.zeros_like, a.empty_like, a.sym_size,
            a.sym_stride, a.sym_numel, a.is_same_size, a._local_scalar_dense}


class _Lazy(set):
    def __contains__(self, item):
        if not len(self):
            self.update(_free_ops())
        return super().__contains__(item)


_FREE = _Lazy()
