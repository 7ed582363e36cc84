"""Rank of a low-rank factorization as plain arithmetic (no torch: the cost predictor uses it too)."""
from __future__ import annotations

import math

from ...errors import LeanfmError


def saves_params(out_features: int, in_features: int, rank: int) -> bool:
    """True when the two factors hold fewer parameters than W: r (in + out) < in * out."""
    return rank * (in_features + out_features) < in_features * out_features


def rank_for(out_features: int, in_features: int, *, rank: int | None = None, rank_ratio: float | None = None,
             param_ratio: float | None = None, name: str = "layer") -> int:
    """Rank of one layer. Precedence: explicit ``rank``; ``rank_ratio`` x min(out, in) (floored);
    ``param_ratio`` = kept / original parameters, r = floor(param_ratio * out * in / (out + in))."""
    full = min(out_features, in_features)
    if rank is not None:
        r, how = rank, f"rank={rank}"
    elif rank_ratio is not None:
        r, how = math.floor(rank_ratio * full + 1e-9), f"rank_ratio={rank_ratio}"
    elif param_ratio is not None:
        r, how = math.floor(param_ratio * out_features * in_features / (out_features + in_features) + 1e-9), f"param_ratio={param_ratio}"
    else:
        raise LeanfmError("low-rank factorization needs one of rank, rank_ratio or param_ratio")
    if r < 1:
        raise LeanfmError(f"{how} gives rank 0 for {name} ({out_features}x{in_features}); raise it")
    if r > full:
        raise LeanfmError(f"{how} gives rank {r} for {name}, above min(out, in) = {full}")
    return r
