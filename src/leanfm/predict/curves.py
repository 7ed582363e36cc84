"""Measured cost curves of a calibrated profile (``local``), as interpolating functions.

``gemv_grid`` ``{in_features: [...], mib: [...], gbps: [[...]]}``: the read bandwidth a one-row
matmul achieves from DRAM by its row length and size (CPUs stream short rows markedly slower, and
small matrices pay a fixed cost per call); a matmul's weight read takes bytes / that bandwidth.

``gemm_fp32_curve`` ``[[rows, FLOP/s], ...]``: achieved fp32 matmul throughput by the number of
rows (tokens) multiplied at once; linear in log(rows) between points, clamped outside.

``gemm_dram_slowdown`` ``[[rows, factor], ...]``: a matmul of that many rows over weights read
from DRAM takes ``factor`` times the one-row GEMV of the same shape; interpolated the same way.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable


def gemv_seconds(grid: dict) -> Callable[[float, int], float]:
    """``(weight bytes, in_features) -> seconds`` of a one-row matmul: the measured bandwidth for
    that row length and size, bilinear in (log in_features, log bytes), clamped to the grid."""
    xs = [math.log(n) for n in grid["in_features"]]
    ys = [math.log(m * 2**20) for m in grid["mib"]]
    g = grid["gbps"]

    def along(axis: list[float], v: float) -> tuple[int, int, float]:
        if v <= axis[0] or len(axis) == 1:
            return 0, 0, 0.0
        if v >= axis[-1]:
            return len(axis) - 1, len(axis) - 1, 0.0
        k = bisect.bisect_right(axis, v)
        return k - 1, k, (v - axis[k - 1]) / (axis[k] - axis[k - 1])

    def f(nbytes: float, in_features: int) -> float:
        i0, i1, u = along(xs, math.log(max(in_features, 1)))
        j0, j1, w = along(ys, math.log(max(nbytes, 1.0)))
        bw = ((1 - u) * ((1 - w) * g[i0][j0] + w * g[i0][j1]) + u * ((1 - w) * g[i1][j0] + w * g[i1][j1]))
        return nbytes / (bw * 1e9)

    return f


def rate_for_rows(points: list[list[float]]) -> Callable[[float], float]:
    """``rows -> value`` through ``[[rows, value], ...]``: linear in log(rows), clamped outside."""
    pts = sorted((float(m), float(r)) for m, r in points)
    xs = [math.log(m) for m, _ in pts]

    def f(rows: float) -> float:
        x = math.log(max(rows, 1e-9))
        if x <= xs[0]:
            return pts[0][1]
        if x >= xs[-1]:
            return pts[-1][1]
        k = bisect.bisect_right(xs, x)
        (x0, r0), (x1, r1) = (xs[k - 1], pts[k - 1][1]), (xs[k], pts[k][1])
        return r0 + (r1 - r0) * (x - x0) / (x1 - x0)

    return f
