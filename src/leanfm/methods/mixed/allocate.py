"""Choosing one format per layer under a byte budget: a multiple-choice knapsack (pure, numpy).

Minimize ``sum_l cost[l][c_l]`` subject to ``sum_l size[l][c_l] <= budget``, one choice ``c_l``
per layer. Exact dynamic programming over a byte axis: every layer's smallest choice is taken
as the base, and only the extra bytes of the other choices are put on a grid of at most
``resolution`` buckets, each extra rounded UP to whole buckets, so whatever the DP picks fits
the budget in real bytes (the rounding can only make it pass over a choice that would have fit
by a few bytes). When the slack fits the grid with 1-byte buckets the result is the exact optimum.

``dp[c]`` = least cost of the layers so far using at most ``c`` buckets of extra bytes;
adding layer ``l``: ``dp'[c] = min_f dp[c - w_lf] + cost_lf`` (the standard multiple-choice
knapsack recurrence, e.g. Kellerer, Pferschy & Pisinger, "Knapsack Problems", 2004, ch. 11),
one numpy pass per (layer, choice); the argmin per (layer, c) is kept for backtracking.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ...errors import LeanfmError


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int,
             resolution: int = 1 << 15) -> list[int]:
    """Index of the chosen option per layer (minimum total cost with total size <= budget)."""
    if len(costs) != len(sizes) or any(len(c) != len(s) or not len(c) for c, s in zip(costs, sizes)):
        raise LeanfmError("allocate needs one non-empty list of costs and sizes per layer, of equal lengths")
    if resolution < 1:
        raise LeanfmError(f"resolution={resolution} must be >= 1")
    cost = [np.asarray(c, dtype=np.float64) for c in costs]
    size = [np.asarray(s, dtype=np.int64) for s in sizes]
    base = int(sum(int(s.min()) for s in size))
    slack = int(budget) - base
    if slack < 0:
        raise LeanfmError(f"budget {int(budget)} bytes is below the smallest allocation ({base} bytes)")
    extra = [s - s.min() for s in size]
    # every layer may take its cheapest-cost option within the slack at once: no trade-off to solve
    if sum(int(e[np.argmin(c)]) for e, c in zip(extra, cost)) <= slack:
        return [int(np.argmin(c)) for c in cost]
    unit = max(1, math.ceil(slack / resolution))  # bytes per bucket
    cap = slack // unit
    weights = [-(-e // unit) for e in extra]  # ceil: rounded up, so the real bytes never exceed the budget
    dp = np.zeros(cap + 1)
    choice = np.zeros((len(cost), cap + 1), dtype=np.int32)
    for l, (c, w) in enumerate(zip(cost, weights)):
        best = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int32)
        for f in np.argsort(w, kind="stable"):  # smaller first: a tie keeps the smaller option
            wf = int(w[f])
            if wf > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[wf:] = dp[: cap + 1 - wf] + c[f]
            better = cand < best
            best[better] = cand[better]
            arg[better] = f
        dp, choice[l] = best, arg
    picks = [0] * len(cost)
    c = cap
    for l in range(len(cost) - 1, -1, -1):
        f = int(choice[l, c])
        picks[l] = f
        c -= int(weights[l][f])
    return picks


def total(values: Sequence[Sequence[float]], picks: Sequence[int]) -> float:
    """``sum_l values[l][picks[l]]``."""
    return float(sum(v[p] for v, p in zip(values, picks)))
