"""``ActQuant``: a linear (usually a packed ``QuantLinear``) whose input activations are
fake-quantized first, as SmoothQuant's W8A8 runs here.

The activation quantization is symmetric, per token and dynamic, applied as a round trip in
fp32 because this CPU has no fast int8 x int8 GEMM path in torch; a step using it is therefore
simulated. Checkpoints record the wrapper's ``bits`` per layer (``act_bits`` in
``leanfm-quant.json``) and rebuild it on load.
"""
from __future__ import annotations

import torch
from torch import nn


def fake_quant_act(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-token dynamic activation quantization (round trip)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s


class ActQuant(nn.Module):
    """Fake-quantizes a linear's input activations, then runs the (packed) linear."""

    def __init__(self, inner: nn.Module, bits: int):
        super().__init__()
        self.inner, self.bits = inner, bits

    def forward(self, x):
        return self.inner(fake_quant_act(x, self.bits))
