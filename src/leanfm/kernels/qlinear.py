"""``QuantLinear``: an ``nn.Linear`` replacement holding packed integer weights.

Its buffers are exactly what its backend stores (packed codes, scale, zero point, any
kernel-specific copy such as bf16 scales), so ``weight_bytes`` counts the real footprint.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.quantized import QuantizedWeight
from . import backends as B


def is_symmetric(qw: QuantizedWeight) -> bool:
    return bool((qw.zero == 2 ** (qw.bits - 1)).all())


class LayoutInfo:
    """``bits`` and ``group_size`` of a packed layer, read from its ``layout``."""

    layout: "B.Layout"

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def group_size(self) -> int:
        return self.layout.group_size


class QuantLinear(LayoutInfo, nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, backend: str = "auto", persistent: bool = True):
        super().__init__()
        out_f, in_f = qw.codes.shape
        self.layout = B.Layout(qw.bits, qw.group_size, in_f, out_f)
        self.in_features, self.out_features = in_f, out_f
        sym = is_symmetric(qw)
        be = B.auto(self.layout, sym) if backend == "auto" else B.get(backend)
        why = be.unsupported(self.layout, sym)
        if why:
            from ..errors import LeanfmError

            raise LeanfmError(why)
        self.backend = be
        self._names = []
        for k, v in be.pack(qw).items():
            self.register_buffer(k, v, persistent=persistent)
            self._names.append(k)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_packed(cls, bufs: dict[str, torch.Tensor], layout: "B.Layout", backend: "B.Backend",
                    bias: torch.Tensor | None = None, persistent: bool = True) -> "QuantLinear":
        """A layer over buffers already in ``backend``'s storage layout (no unpacking, no copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.layout, self.in_features, self.out_features = layout, layout.in_features, layout.out_features
        self.backend, self._names = backend, list(bufs)
        for k, v in bufs.items():
            self.register_buffer(k, v, persistent=persistent)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return self

    def _bufs(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._names}

    def quantized_weight(self) -> QuantizedWeight:
        return self.backend.unpack(self._bufs(), self.layout)

    def dequantized_weight(self) -> torch.Tensor:
        return self.backend.dequantize(self._bufs(), self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.forward(x, self._bufs(), self.layout)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, backend={self.backend.name}"
