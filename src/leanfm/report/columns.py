"""Which metrics the table and report show, and how each is formatted."""
from __future__ import annotations

MiB = 1024 * 1024

# (metric name, header, formatter)
COLUMNS = [
    ("perplexity", "ppl", lambda v: f"{v:.3f}"),
    ("ppl_increase", "Δppl", lambda v: f"{v * 100:+.2f}%"),
    ("top1_agreement", "top1", lambda v: f"{v:.4f}"),
    ("kl_to_baseline", "KL", lambda v: f"{v:.4f}"),
    ("weight_bytes", "weights MiB", lambda v: f"{v / MiB:.1f}"),
    ("peak_rss_bytes", "peak RSS MiB", lambda v: f"{v / MiB:.0f}"),
    ("kv_cache_bytes", "KV MiB", lambda v: f"{v / MiB:.2f}"),
    ("prefill_ms", "prefill ms", lambda v: f"{v:.1f}"),
    ("predicted_prefill_ms", "predicted", lambda v: f"{v:.1f}"),
    ("tpot_ms_p50", "TPOT p50 ms", lambda v: f"{v:.2f}"),
    ("decode_tokens_per_s", "decode tok/s", lambda v: f"{v:.2f}"),
    ("predicted_decode_tokens_per_s", "predicted", lambda v: f"{v:.2f}"),
    ("speedup", "speedup", lambda v: f"{v:.2f}×"),
    ("energy_j_per_token", "J/token", lambda v: f"{v:.3f}"),
    ("usd_per_million_tokens", "$/1M tok", lambda v: f"{v:.3f}"),
]


def cell(metrics: dict, key: str, fmt) -> str:
    v = metrics.get(key)
    return "–" if v is None else fmt(v)


def flag_text(run: dict) -> str:
    f = run.get("flags") or {}
    if run.get("status") != "ok":
        return f"error: {run.get('error', '')}"
    return ("simulated" if f.get("simulated") else "real") + f" · {f.get('kernel', '?')}"
