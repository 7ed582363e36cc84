"""Predicted next to measured: the roofline prediction for a ``leanfm bench`` run.

``bench`` calls :func:`prediction_for_run` with the model's *original* config (before the recipe
changed it) and the run's recipe, on the ``local`` hardware profile (its cached calibration when
present); the predicted ``prefill_ms`` / ``decode_tokens_per_s`` go into the run's metrics as
``predicted_prefill_ms`` / ``predicted_decode_tokens_per_s`` and the signed errors against the
measured values into ``prefill_prediction_error_pct`` / ``decode_prediction_error_pct``. A prediction that cannot be made (an architecture or a
method the analyzer does not model) is recorded as ``{"error": ...}`` and never fails the run.
"""
from __future__ import annotations

from ..errors import LeanfmError

_KEYS = {"prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


def prediction_for_run(config, recipe, batch: int, prompt: int, gen: int, threads: int, hardware: str = "local") -> dict:
    """The compact prediction stored in ``details.prediction`` of a run (``config``: a config dict or
    anything ``predict`` resolves, e.g. an alias; ``threads``: the
    calibration of ``local`` to use, the protocol's thread count)."""
    from .analyzer import predict
    from .hardware import load_hardware

    try:
        hw = load_hardware(hardware, threads=threads)
        r = predict(config, recipe, hw, batch=batch, prompt=prompt, gen=gen)
    except LeanfmError as e:
        return {"error": str(e)}
    return {
        "hardware": r["hardware"], "calibrated": bool(hw.get("calibrated", False)), "threads": threads,
        "prefill_ms": r["prefill_ms"], "decode_tokens_per_s": r["decode_tokens_per_s"], "tpot_ms": r["tpot_ms"],
        "weight_bytes": r["weight_bytes"], "kv_cache_bytes": r["kv_cache_bytes"], "flops_per_token": r["flops_per_token"],
        "bound": r["bound"], "speedup_vs_baseline": r["speedup_vs_baseline"],
        "will_speed_up": r["will_speed_up"], "will_speed_up_reason": r["will_speed_up_reason"],
        "fits": r["fits"], "memory_total_bytes": r["memory_total_bytes"],  # will_speed_up is null when it does not fit
    }


def compare(prediction: dict, metrics: dict) -> dict:
    """``predicted_*`` metrics and the signed error of each prediction against the measurement, in %
    (positive = predicted more than measured)."""
    out = {}
    if "error" in prediction:
        return out
    for k, short in _KEYS.items():
        out[f"predicted_{k}"] = prediction[k]
        if metrics.get(k):
            out[f"{short}_prediction_error_pct"] = (prediction[k] / metrics[k] - 1.0) * 100.0
    return out
