"""Model glue shared by the weight quantizers (their configs: :mod:`.decl`).

An algorithm produces one :class:`~.grid.QuantizedWeight` per linear layer; :func:`install`
then puts them into the model with the chosen execution ``backend``:

- ``auto`` (default): the fastest real kernel that runs the layout here (``tinygemm-int4`` for
  <= 4 bits, ``int8pack`` for 8-bit symmetric per-channel), else ``reference``;
- ``reference`` / ``tinygemm-int4`` / ``int8pack``: that backend, or a one-line error;
- ``fake``: write the dequantized values back into the fp32 ``nn.Linear`` (``simulated: true``;
  memory and speed are those of fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError
from ...kernels import backends
from ...kernels.qlinear import QuantLinear
from .grid import QuantizedWeight, resolve_group_size

def check_layers(cfg, model: nn.Module) -> None:
    """Every target layer fits the config (group size divides it, the chosen backend runs it)."""
    layers = list(cfg.targets(model).items())
    check_not_quantized(model, cfg.method, bool(layers))
    if not layers:
        raise LeanfmError(f"{cfg.method} found no nn.Linear layers to quantize (check 'skip' and 'only')")
    for name, mod in layers:
        gs = resolve_group_size(mod.in_features, cfg.group_size, name)
        if cfg.backend not in ("auto", "fake"):
            lay = backends.Layout(cfg.bits, gs, mod.in_features, mod.out_features)
            why = backends.get(cfg.backend).unsupported(lay, cfg.symmetric)
            if why:
                raise LeanfmError(f"layer {name}: {why}; use backend: auto or reference")


def _quantized_by(step: dict) -> bool:
    from ...config import registered

    cls = registered(step.get("method"))
    return cls is not None and cls.produces == "int-weights"


def check_not_quantized(model: nn.Module, method: str, has_targets: bool = False) -> None:
    """Quantizing twice compounds rounding on an already-rounded grid: refuse it. Packed layers
    are never targets (they are not nn.Linear), so a later step may quantize the linears an
    earlier one left in full precision; fake-quantized steps leave no trace on the layers, so
    any later quantization is refused."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and not has_targets:
            raise LeanfmError(
                f"cannot apply {method}: the model is already quantized (layer {name} holds {mod.bits}-bit packed weights); "
                "start from the full-precision checkpoint"
            )
    done = [s["method"] for s in getattr(model, "leanfm_info", {}).get("steps", []) if _quantized_by(s) and s.get("simulated")]
    if done:
        raise LeanfmError(f"cannot apply {method}: the model's weights were already quantized by {done[-1]}; start from the full-precision checkpoint")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def install(model: nn.Module, qws: dict[str, QuantizedWeight], backend: str, fuse: bool = True) -> dict:
    """Put quantized weights into ``model``; return the step's ``simulated``/``kernel`` info.

    With ``fuse``, packed siblings that read the same input (q/k/v, gate/up) then share one
    kernel call (:mod:`leanfm.kernels.fuse`); the info records how many groups were fused."""
    if backend == "fake":
        from .grid import dequantize

        with torch.no_grad():
            for name, qw in qws.items():
                lin = model.get_submodule(name)
                lin.weight.copy_(dequantize(qw.codes, qw.scale, qw.zero, qw.group_size).to(lin.weight.dtype))
        return {"simulated": True, "kernel": "torch-dense-fp32 (fake-quant)", "layers": len(qws)}
    from ...kernels.checkpoint import kernel_summary

    for name, qw in qws.items():
        parent, child = _parent(model, name)
        lin = getattr(parent, child)
        setattr(parent, child, QuantLinear(qw, lin.bias, backend))
        # the replaced linear may still be referenced (a method's target list): drop its fp32
        # tensors so they are freed now, not when the method returns (a tied weight stays with
        # its other owner: only this module's reference goes)
        lin._parameters["weight"] = None
        lin._parameters["bias"] = None
    from ...kernels.fuse import fuse_shared_inputs

    groups = fuse_shared_inputs(model) if fuse else 0
    return {"simulated": False, "kernel": kernel_summary(model), "layers": len(qws), "fused_groups": groups}


class LayerPacker:
    """``on_layer`` callback for the layer-by-layer quantizers: packs each decoder layer's weights
    as soon as the layer is done (a whole model's unpacked uint8 codes never pile up, and an
    onloaded layer is written packed); siblings are fused once at the end by :func:`install`."""

    def __init__(self, model: nn.Module, backend: str):
        self.model, self.backend, self.count = model, backend, 0

    def __call__(self, qws: dict[str, QuantizedWeight]) -> None:
        install(self.model, qws, self.backend, fuse=False)
        self.count += len(qws)
