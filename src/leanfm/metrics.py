"""Every metric results.json can hold: its group, unit and which way is better.

The names, groups and units are those of the table in docs/results-schema.md, "## Metrics"
(a test keeps the two equal). ``better`` is ``"max"`` or ``"min"`` where more (or less) of the
metric is plainly better for a user, and ``None`` where there is no such direction: counts that
describe the protocol (``eval_tokens``), text (``energy_source``), hardware-efficiency
diagnostics that a slower model can score higher on (``achieved_gbps``, ``roofline_fraction``)
and signed prediction errors, whose best value is 0.
"""
from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    group: str  # quality, speed, memory, energy, training, network
    unit: str  # as written in docs/results-schema.md ("–" for a dimensionless number)
    better: str | None  # "max", "min" or None


METRICS: dict[str, Metric] = {
    # quality
    "perplexity": Metric("quality", "–", "min"),
    "eval_tokens": Metric("quality", "tokens", None),
    "top1_agreement": Metric("quality", "fraction", "max"),
    "kl_to_baseline": Metric("quality", "nats/token", "min"),
    "ppl_increase": Metric("quality", "fraction", "min"),
    "knn_accuracy": Metric("quality", "fraction", "max"),
    "linear_probe_accuracy": Metric("quality", "fraction", "max"),
    "feature_cosine": Metric("quality", "–", "max"),
    "zero_shot_accuracy": Metric("quality", "fraction", "max"),
    "psnr_db": Metric("quality", "dB", "max"),
    "ssim": Metric("quality", "–", "max"),
    "value_w1": Metric("quality", "data units", "min"),
    # speed
    "prefill_ms": Metric("speed", "ms", "min"),
    "tpot_ms_p50": Metric("speed", "ms", "min"),
    "tpot_ms_p90": Metric("speed", "ms", "min"),
    "decode_tokens_per_s": Metric("speed", "tokens/s", "max"),
    "images_per_s": Metric("speed", "images/s", "max"),
    "ms_per_image": Metric("speed", "ms", "min"),
    "samples_per_s": Metric("speed", "samples/s", "max"),
    "ms_per_sample": Metric("speed", "ms", "min"),
    "ms_per_step": Metric("speed", "ms", "min"),
    "speedup": Metric("speed", "×", "max"),
    "acceptance_rate": Metric("speed", "–", "max"),
    "mean_accepted_tokens": Metric("speed", "tokens", "max"),
    "mean_layers_used": Metric("speed", "layers", "min"),
    "early_exit_rate": Metric("speed", "–", "max"),
    "achieved_gbps": Metric("speed", "GB/s", None),
    "roofline_fraction": Metric("speed", "–", None),
    "flops_per_token": Metric("speed", "FLOP", "min"),
    "compile_seconds": Metric("speed", "s", None),
    # memory
    "weight_bytes": Metric("memory", "bytes", "min"),
    "compression_ratio": Metric("memory", "×", "max"),
    "model_size_on_disk_bytes": Metric("memory", "bytes", "min"),
    "pipeline_weight_bytes": Metric("memory", "bytes", "min"),
    "peak_rss_bytes": Metric("memory", "bytes", "min"),
    "kv_cache_bytes": Metric("memory", "bytes", "min"),
    # energy and cost
    "energy_j_per_token": Metric("energy", "J", "min"),
    "energy_source": Metric("energy", "–", None),
    "usd_per_million_tokens": Metric("energy", "USD", "min"),
    "co2_g_per_million_tokens": Metric("energy", "gCO₂", "min"),
    # the roofline prediction made before the measurement
    "predicted_prefill_ms": Metric("speed", "ms", "min"),
    "predicted_decode_tokens_per_s": Metric("speed", "tokens/s", "max"),
    "prefill_prediction_error_pct": Metric("speed", "%", None),
    "predicted_ms_per_image": Metric("speed", "ms", "min"),
    "ms_per_image_prediction_error_pct": Metric("speed", "%", None),
    "predicted_ms_per_step": Metric("speed", "ms", "min"),
    "ms_per_step_prediction_error_pct": Metric("speed", "%", None),
    "decode_prediction_error_pct": Metric("speed", "%", None),
    # fine-tuning (leanfm tune) and its network cost
    "ppl_gap_recovered": Metric("quality", "fraction", "max"),
    "trainable_params": Metric("training", "params", None),
    "peak_train_rss_bytes": Metric("training", "bytes", "min"),
    "train_seconds": Metric("training", "s", "min"),
    "train_tokens_per_s": Metric("training", "tokens/s", "max"),
    "train_energy_j": Metric("training", "J", "min"),
    "predicted_peak_train_rss_bytes": Metric("training", "bytes", None),
    "train_memory_prediction_error_pct": Metric("training", "%", None),
    "network_bytes_per_step": Metric("network", "bytes", "min"),
    "network_bytes_per_round": Metric("network", "bytes", "min"),
}

# Metrics whose value is text, not a number: no budget or objective can use them.
TEXT_METRICS = frozenset({"energy_source"})
