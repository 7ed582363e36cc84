"""Bytes a decode step reads and the bandwidth a measured step achieved.

A batch-``B`` decode step reads every weight a token passes through once (each linear layer's
stored tensors, packed or not; a tied LM head reads the embedding matrix; the embedding lookup
itself reads one row and is ignored) plus the KV cache. ``achieved_gbps`` = bytes / measured
step time; the roofline bound the step is compared with (``roofline_fraction``) is the roofline
model's, :func:`leanfm.predict.roofline.measured_step`.
"""
from __future__ import annotations

from torch import nn

from ..predict.roofline import measured_step


def linear_like(model: nn.Module):
    """Leaf modules that do a per-token matmul: nn.Linear, packed QuantLinear, CSR SparseLinear."""
    from ..kernels.qembedding import QuantEmbedding
    from ..kernels.qlinear import QuantLinear
    from ..kernels.sparse import SparseLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tables = {id(m.table) for m in model.modules() if isinstance(m, QuantEmbedding)} - {id(head)}
    for m in model.modules():  # a packed embedding table is a lookup, unless it is also the (tied) head
        if isinstance(m, (nn.Linear, QuantLinear, SparseLinear)) and id(m) not in tables:
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


def roofline_metrics(model: nn.Module, tokens_per_s: float, batch: int, flops_per_token: float, kv_bytes_mean: float, profile: dict,
                     weight_bytes: int | None = None) -> dict:
    """``achieved_gbps``, ``roofline_fraction`` and ``decode_bytes_per_step`` of a decode step
    measured at ``tokens_per_s`` (``{}`` without a speed or without the profile's rates).
    ``weight_bytes``: the bytes a step reads from weights when they are not ``model``'s own (a
    runtime's file); default: every linear-like layer's stored tensors."""
    if not tokens_per_s:
        return {}
    wb = decode_weight_bytes(model) if weight_bytes is None else weight_bytes
    return measured_step(batch / tokens_per_s, wb + kv_bytes_mean, batch * flops_per_token, profile)
