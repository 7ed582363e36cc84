"""Shared config fields and model glue for weight-only quantizers (RTN, GPTQ, AWQ, HQQ).

An algorithm produces one :class:`~.grid.QuantizedWeight` per linear layer; :func:`install`
then puts them into the model with the chosen execution ``backend``:

- ``auto`` (default): the fastest real kernel that runs the layout here (``tinygemm-int4`` for
  <= 4 bits, ``int8pack`` for 8-bit symmetric per-channel), else ``reference``;
- ``reference`` / ``tinygemm-int4`` / ``int8pack``: that backend, or a one-line error;
- ``fake``: write the dequantized values back into the fp32 ``nn.Linear`` (``simulated: true``;
  memory and speed are those of fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import BaseConfig
from ...errors import LeanfmError
from ...kernels import backends
from ...kernels.qlinear import QuantLinear
from ..targets import iter_linears
from .grid import QuantizedWeight, check_bits, resolve_group_size

BACKEND_CHOICES = ("auto", "fake", *backends.BACKENDS)


@dataclass
class WeightQuantConfig(BaseConfig):
    """Fields shared by weight-only quantizers.

    bits: 2..8. group_size: columns sharing one scale (null = per output channel; must divide
    each layer's in_features). symmetric: zero point fixed at the grid midpoint.
    skip: linear layers left in full precision (names or fnmatch patterns; lm_head by default).
    only: if given, quantize just the linears matching these patterns (e.g. [lm_head]).
    backend: auto | fake | reference | tinygemm-int4 | int8pack (see the module docstring).
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    only: tuple[str, ...] = ()
    backend: str = "auto"

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        return dict(iter_linears(model, self.skip, self.only))

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for per-channel)")
        if self.backend not in BACKEND_CHOICES:
            raise LeanfmError(f"unknown backend '{self.backend}' for {self.method}; use one of: {', '.join(BACKEND_CHOICES)}")

    def check_model(self, model: nn.Module) -> None:
        layers = list(self.targets(model).items())
        check_not_quantized(model, self.method, bool(layers))
        if not layers:
            raise LeanfmError(f"{self.method} found no nn.Linear layers to quantize (check 'skip' and 'only')")
        for name, mod in layers:
            gs = resolve_group_size(mod.in_features, self.group_size, name)
            if self.backend not in ("auto", "fake"):
                lay = backends.Layout(self.bits, gs, mod.in_features, mod.out_features)
                why = backends.get(self.backend).unsupported(lay, self.symmetric)
                if why:
                    raise LeanfmError(f"layer {name}: {why}; use backend: auto or reference")


QUANT_METHODS = {"rtn", "gptq", "awq", "hqq", "smoothquant"}


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
    done = [s["method"] for s in getattr(model, "leanfm_info", {}).get("steps", []) if s.get("method") in QUANT_METHODS and s.get("simulated")]
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
    from ...kernels.fuse import fuse_shared_inputs

    groups = fuse_shared_inputs(model) if fuse else 0
    return {"simulated": False, "kernel": kernel_summary(model), "layers": len(qws), "fused_groups": groups}
