"""Analytic FLOPs per generated token.

Matmul FLOPs: 2 x (in x out) for every ``nn.Linear`` that runs per token (LM head included,
embedding lookups excluded; pruned/factorized layers count with their real shapes, CSR layers
with their non-zeros), plus
attention: for each layer, scores ``Q K^T`` and the weighted sum ``A V`` cost
2 x 2 x n_heads x head_dim x context FLOPs per token. ``context`` is the mean cache length over
the measured decode steps (prompt + (gen + 1) / 2).
"""
from __future__ import annotations

from torch import nn

from ..models.family import decoder_config


def linear_flops_per_token(model: nn.Module) -> int:
    from .bandwidth import linear_like  # nn.Linear and packed QuantLinear alike

    # a CSR layer multiplies only its stored non-zeros; masked (simulated) zeros still cost FLOPs
    return sum(2 * (getattr(mod, "nnz", None) or mod.in_features * mod.out_features) for mod in linear_like(model))


def attention_flops_per_token(model: nn.Module, context: float) -> float:
    cfg = decoder_config(model)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 4.0 * cfg.num_hidden_layers * heads * head_dim * context


def flops_per_token(model: nn.Module, context: float) -> float:
    return linear_flops_per_token(model) + attention_flops_per_token(model, context)
