"""Width-pruning math: importance scores from calibration statistics, and physical slicing.

Importance (Wanda-style, Sun et al. 2024 "A Simple and Effective Pruning Approach for LLMs",
eq. 1, |W_ij| * ||X_j||_2, summed over a structure as in LLM-Pruner's group importance, Ma et
al. 2023 §3.2):

- MLP channel j (one row of gate/up, one column of down):  I_j = ||X_down[:, j]||_2 * ||W_down[:, j]||_2,
  where X_down are down_proj's inputs act(gate(x)) * up(x) on the calibration tokens. The channel's
  contribution to the layer output is X_down[:, j] W_down[:, j]^T, a rank-one matrix whose
  Frobenius norm is exactly this product.
- Attention head h (columns S_h = [h*d, (h+1)*d) of o_proj):  I_h = ||X_o[:, S_h]||_F * ||W_o[:, S_h]||_F,
  the same product of norms for the head's block of o_proj (an upper bound on the norm of the
  head's contribution X_o[:, S_h] W_o[:, S_h]^T). A key/value group (one KV head and the
  n_heads / n_kv_heads query heads that read it, as ``repeat_kv`` lays them out: query head h uses
  KV head h // rep) scores the sum of its query heads' I_h.

Only sums of squares per input column are accumulated (O(width) memory per layer).
"""
from __future__ import annotations

import torch
from torch import nn


def mlp_channel_importance(x_sumsq: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``x_sumsq[j]`` = sum over tokens of X_down[:, j]^2; ``w_down`` is ``[hidden, inter]``. -> ``[inter]``."""
    return x_sumsq.double().sqrt() * w_down.double().norm(dim=0)


def kv_group_importance(x_sumsq: torch.Tensor, w_o: torch.Tensor, head_dim: int, n_groups: int) -> torch.Tensor:
    """``x_sumsq`` ``[heads*head_dim]`` of o_proj's inputs, ``w_o`` ``[hidden, heads*head_dim]`` -> ``[n_groups]``."""
    heads = w_o.shape[1] // head_dim
    x_norm = x_sumsq.double().reshape(heads, head_dim).sum(1).sqrt()  # ||X_o[:, S_h]||_F
    w_norm = w_o.double().reshape(w_o.shape[0], heads, head_dim).pow(2).sum((0, 2)).sqrt()  # ||W_o[:, S_h]||_F
    return (x_norm * w_norm).reshape(n_groups, heads // n_groups).sum(1)


def keep_top(importance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` most important entries, in their original order."""
    return torch.sort(torch.topk(importance, n_keep).indices).values


def group_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Rows of a projection whose heads come in groups of ``per_group`` heads of ``head_dim`` rows."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@torch.no_grad()
def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and/or input ``cols`` of ``lin`` in place (new, smaller parameters)."""
    w = lin.weight
    if rows is not None:
        w = w[rows]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias[rows].clone(), requires_grad=lin.bias.requires_grad)
    if cols is not None:
        w = w[:, cols]
    lin.weight = nn.Parameter(w.clone().contiguous(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape
