"""RTN (round-to-nearest) weight-only quantization: config and thin model glue.

The math is in :mod:`.grid`. Here weights are fake-quantized in place (fp32 values on the
integer grid), so the run is recorded as ``simulated: true`` with the dense fp32 kernel: memory
and speed do not change until a packed format and kernel run them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import BaseConfig, register
from ...errors import LeanfmError
from ..targets import iter_linears
from .grid import check_bits, fake_quantize, resolve_group_size


@dataclass
class RTNConfig(BaseConfig):
    """Round-to-nearest weight quantization.

    bits: 2..8. group_size: columns sharing one scale (null = per output channel; must divide
    each layer's in_features). symmetric: zero point fixed at the grid midpoint.
    skip: linear layers left in full precision (names or fnmatch patterns; lm_head by default).
    """

    method = "rtn"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    skip: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for per-channel)")

    def check_model(self, model: nn.Module) -> None:
        layers = list(iter_linears(model, self.skip))
        if not layers:
            raise LeanfmError("rtn found no nn.Linear layers to quantize (check 'skip')")
        for name, mod in layers:
            resolve_group_size(mod.in_features, self.group_size, name)


@register(RTNConfig)
def apply_rtn(model: nn.Module, cfg: RTNConfig, calib=None) -> dict:
    cfg.check_model(model)  # every layer is validated before any is touched
    layers = list(iter_linears(model, cfg.skip))
    with torch.no_grad():
        for _, mod in layers:
            mod.weight.copy_(fake_quantize(mod.weight, cfg.bits, cfg.group_size, cfg.symmetric))
    return {"simulated": True, "kernel": "torch-dense-fp32 (fake-quant)", "layers": len(layers)}
