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


def cell(metrics: dict, key: str, fmt, run: dict | None = None) -> str:
    v = metrics.get(key)
    text = "–" if v is None else fmt(v)
    if key == "speedup" and v is not None and run is not None and (run.get("flags") or {}).get("noisy"):
        text += " noisy"  # the reason is in the execution column and results.json
    return text


def flag_text(run: dict) -> str:
    f = run.get("flags") or {}
    status = run.get("status")
    if status == "timing":
        return "interrupted before its speed was measured (other metrics kept)"
    if status != "ok":
        return f"error: {run.get('error', '')}"
    text = ("simulated" if f.get("simulated") else "real") + f" · {f.get('kernel', '?')}"
    return text + (f" · NOISY: {f['noisy_reason']}" if f.get("noisy_reason") else "")
