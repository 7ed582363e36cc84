"""Small statistics shared by the timers and the load-test client (torch-free)."""
from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of a non-empty list, linear between the two nearest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
