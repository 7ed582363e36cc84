"""Which cached positions a KV policy keeps: pure tensor functions, no model.

Indices always refer to the cache's current order, which every policy here keeps chronological
(oldest first). Returned index sets are sorted ascending so that the newest tokens stay at the
end of the cache; the causal mask relies on that (see ``layers.EvictingLayer``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def streaming_keep(n: int, budget: int, sinks: int) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2024, Sec. 3.2): keep the first ``sinks`` tokens (attention
    sinks) and the most recent ``budget - sinks``; everything when ``n <= budget``."""
    if n <= budget:
        return torch.arange(n)
    window = budget - sinks
    return torch.cat([torch.arange(sinks), torch.arange(n - window, n)])


def group_scores(probs: torch.Tensor, n_kv_heads: int, rows: int | None = None) -> torch.Tensor:
    """Attention each cached key received: ``[B, Hq, q, n]`` probabilities -> ``[B, Hkv, n]``.

    Sums over the last ``rows`` query rows (all when None) and over the query heads that share
    one KV head (grouped-query attention: query head h reads KV head ``h // (Hq / Hkv)``).
    """
    b, hq, q, n = probs.shape
    if rows is not None:
        probs = probs[:, :, q - rows:, :]
    s = probs.float().sum(dim=2)  # [B, Hq, n]
    return s.view(b, n_kv_heads, hq // n_kv_heads, n).sum(dim=2)


def h2o_keep(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """H2O (Zhang et al. 2023, Alg. 1): keep the ``recent`` newest tokens plus the
    ``budget - recent`` older ones with the largest accumulated attention ("heavy hitters").

    ``scores``: ``[..., n]`` accumulated attention per cached token. Returns ``[..., min(n, budget)]``
    sorted indices, chosen independently per leading index (per batch row and KV head).
    """
    n = scores.shape[-1]
    lead = scores.shape[:-1]
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(*lead, n)
    recent = min(recent, budget)
    rec = torch.arange(n - recent, n, device=scores.device).expand(*lead, recent)
    heavy = budget - recent
    if heavy == 0:
        return rec
    top = scores[..., : n - recent].topk(heavy, dim=-1).indices
    return torch.cat([top, rec], dim=-1).sort(dim=-1).values


def tova_keep(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", Sec. 4): when the cache is
    over budget, drop the tokens the newest query attends to least, the score averaged over all
    heads of the layer, so one set of tokens is kept for every head.

    ``scores``: ``[B, n]`` attention from the newest query (head-averaged). Returns sorted
    ``[B, min(n, budget)]`` indices of the tokens kept (the ``budget`` highest-scored)."""
    b, n = scores.shape
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(b, n)
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


def snapkv_scores(probs: torch.Tensor, n_kv_heads: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV (Li et al. 2024, Sec. 4.2, Eq. 1-2) voting: attention of the last ``window`` queries
    (the observation window) to each prefix key, summed over the window and the query heads of a
    KV group, then smoothed by a 1-D pool of width ``kernel`` so neighbours of a hit survive too.

    ``probs``: ``[B, Hq, q, n]`` with ``q >= window``. Returns ``[B, Hkv, n - window]``.
    """
    n = probs.shape[-1]
    s = group_scores(probs[..., : n - window], n_kv_heads, rows=window)  # [B, Hkv, n - w]
    if kernel > 1:
        b, h, m = s.shape
        flat = s.reshape(b * h, 1, m)
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        kw = {} if pooling == "max" else {"count_include_pad": False}
        s = pool(flat, kernel_size=kernel, stride=1, padding=kernel // 2, **kw).reshape(b, h, m)
    return s


def snapkv_keep(scores: torch.Tensor, n: int, budget: int, window: int) -> torch.Tensor:
    """Keep the top ``budget - window`` prefix tokens by ``scores`` (``[..., n - window]``) per head,
    plus the whole observation window (the last ``window`` tokens). Sorted ``[..., min(n, budget)]``."""
    lead = scores.shape[:-1]
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(*lead, n)
    win = torch.arange(n - window, n, device=scores.device).expand(*lead, window)
    top = scores.topk(budget - window, dim=-1).indices
    return torch.cat([top, win], dim=-1).sort(dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, j], :]``: ``[B, H, n, D]`` and ``[B, H, k]`` -> ``[B, H, k, D]``."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))
