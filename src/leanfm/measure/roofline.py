"""Where decode time goes: bytes a decode step must read, achieved bandwidth, roofline share.

A batch-``B`` decode step reads every weight a token passes through once (each linear layer's
stored tensors, packed or not; a tied LM head reads the embedding matrix; the embedding lookup
itself reads one row and is ignored) plus the KV cache. The roofline bound of the step is
``max(bytes / bandwidth, B x flops_per_token / peak_flops)`` with the hardware profile's
``memory_bandwidth_gbps`` and ``peak_gflops_fp32``; ``roofline_fraction`` = bound / measured step
time (1.0 = running at the hardware limit). ``achieved_gbps`` = bytes / measured step time.
"""
from __future__ import annotations

from torch import nn


def linear_like(model: nn.Module):
    """Leaf modules that do a per-token matmul: nn.Linear, packed QuantLinear, CSR SparseLinear."""
    from ..kernels.qlinear import QuantLinear
    from ..kernels.sparse import SparseLinear

    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear, SparseLinear)):
            yield m


def decode_weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for m in linear_like(model):
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def roofline_metrics(model: nn.Module, tokens_per_s: float, batch: int, flops_per_token: float, kv_bytes_mean: float, profile: dict) -> dict:
    bw, peak = profile.get("memory_bandwidth_gbps"), profile.get("peak_gflops_fp32")
    if not bw or not peak or not tokens_per_s:
        return {}
    step_s = batch / tokens_per_s
    nbytes = decode_weight_bytes(model) + kv_bytes_mean
    bound = max(nbytes / (bw * 1e9), batch * flops_per_token / (peak * 1e9))
    return {"achieved_gbps": nbytes / step_s / 1e9, "roofline_fraction": bound / step_s, "decode_bytes_per_step": nbytes}
