"""Screening candidates with the predictor before any is run.

The roofline predictor (:mod:`leanfm.predict`) prices a recipe from the model's config alone in
milliseconds. A candidate whose *predicted* value of a budgeted metric misses the bound by more
than the predictor's slack for that metric is rejected without running; metrics the predictor
does not give (quality) are left to the measurement.

Slack: weight bytes are counted from the same tensor layouts the methods write, so they get 2%;
speed, energy and money come from a roofline with measured per-op overheads, whose error on this
project's CPUs is up to ~25% (docs/predict.md), so they get 25%. A candidate is rejected only
when even the slack cannot save it.
"""
from __future__ import annotations

from ..metrics import METRICS
from .budget import Constraint

# metric -> key of the predictor's answer (``leanfm.predict.analyzer.predict``)
PREDICTED = {
    "weight_bytes": "weight_bytes", "kv_cache_bytes": "kv_cache_bytes", "prefill_ms": "prefill_ms",
    "tpot_ms_p50": "tpot_ms", "decode_tokens_per_s": "decode_tokens_per_s", "flops_per_token": "flops_per_token",
    "energy_j_per_token": "energy_j_per_token", "usd_per_million_tokens": "usd_per_million_tokens",
    "co2_g_per_million_tokens": "co2_g_per_million_tokens",
}
DERIVED = ("speedup", "compression_ratio")  # from a prediction and the predicted baseline
SLACK = {"memory": 0.02}
DEFAULT_SLACK = 0.25


def predicted_metrics(pred: dict, base: dict | None = None) -> dict:
    """The results-schema metrics a prediction gives (plus ``speedup``/``compression_ratio``
    against the predicted baseline ``base``)."""
    out = {m: float(pred[k]) for m, k in PREDICTED.items() if isinstance(pred.get(k), (int, float))}
    if base:
        if out.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            out["speedup"] = out["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if out.get("weight_bytes") and base.get("weight_bytes"):
            out["compression_ratio"] = base["weight_bytes"] / out["weight_bytes"]
    return out


def slack(metric: str) -> float:
    return SLACK.get(METRICS[metric].group, DEFAULT_SLACK)


def screen(constraints: list[Constraint], pred: dict, base_pred: dict, base_measured: dict) -> str | None:
    """Why a candidate cannot meet the budget by its prediction (None: it may; run it).

    A relative bound (``0.3x``) compares the predicted ratio to the predicted baseline, so the
    predictor's systematic error cancels; an absolute bound compares the predicted value."""
    for c in constraints:
        if c.metric not in pred:
            continue
        v = pred[c.metric]
        if c.relative:
            b = base_pred.get(c.metric)
            if not b:
                continue
            value, bound = v / b, c.value
        else:
            value, bound = v, c.resolve(base_measured)
        s = slack(c.metric)
        lo_ok = value >= bound * (1 - s) if bound >= 0 else value >= bound * (1 + s)
        hi_ok = value <= bound * (1 + s) if bound >= 0 else value <= bound * (1 - s)
        ok = hi_ok if c.op in ("<=", "<") else lo_ok
        if not ok:
            shown = f"{value:.3g}x of the baseline" if c.relative else f"{value:.4g}"
            return f"predicted {c.metric} {shown} misses {c} (slack {s:.0%})"
    return None
