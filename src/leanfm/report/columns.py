"""Which metrics the table and report show, and how each is formatted."""
from __future__ import annotations

import math

MiB = 1024 * 1024
MISSING = "–"  # a metric not measured (absent, null, NaN), as in every table leanfm prints

# (metric name, header, formatter)
COLUMNS = [
    ("perplexity", "ppl", lambda v: f"{v:.3f}"),
    ("ppl_increase", "Δppl", lambda v: f"{v * 100:+.2f}%"),
    ("top1_agreement", "top1", lambda v: f"{v:.4f}"),
    ("kl_to_baseline", "KL", lambda v: f"{v:.4f}"),
    ("knn_accuracy", "k-NN acc", lambda v: f"{v * 100:.1f}%"),
    ("zero_shot_accuracy", "0-shot acc", lambda v: f"{v * 100:.1f}%"),
    ("psnr_db", "PSNR dB", lambda v: f"{v:.2f}"),
    ("ssim", "SSIM", lambda v: f"{v:.4f}"),
    ("linear_probe_accuracy", "probe acc", lambda v: f"{v * 100:.1f}%"),
    ("feature_cosine", "feat. cos", lambda v: f"{v:.4f}"),
    ("weight_bytes", "weights MiB", lambda v: f"{v / MiB:.1f}"),
    ("peak_rss_bytes", "peak RSS MiB", lambda v: f"{v / MiB:.0f}"),
    ("kv_cache_bytes", "KV MiB", lambda v: f"{v / MiB:.2f}"),
    ("prefill_ms", "prefill ms", lambda v: f"{v:.1f}"),
    ("predicted_prefill_ms", "predicted", lambda v: f"{v:.1f}"),
    ("tpot_ms_p50", "TPOT p50 ms", lambda v: f"{v:.2f}"),
    ("decode_tokens_per_s", "decode tok/s", lambda v: f"{v:.2f}"),
    ("predicted_decode_tokens_per_s", "predicted", lambda v: f"{v:.2f}"),
    ("images_per_s", "images/s", lambda v: f"{v:.2f}"),
    ("ms_per_image", "ms/image", lambda v: f"{v:.1f}"),
    ("ms_per_sample", "ms/sample", lambda v: f"{v:.1f}"),
    ("ms_per_step", "ms/step", lambda v: f"{v:.1f}"),
    ("predicted_ms_per_step", "predicted", lambda v: f"{v:.1f}"),
    ("predicted_ms_per_image", "predicted", lambda v: f"{v:.1f}"),
    ("speedup", "speedup", lambda v: f"{v:.2f}×"),
    ("energy_j_per_token", "J/token", lambda v: f"{v:.3f}"),
    ("usd_per_million_tokens", "$/1M tok", lambda v: f"{v:.3f}"),
]

FIDELITY = ("top1_agreement", "kl_to_baseline")

# metrics.energy_source (measure/energy.py) -> (mark after the J/token value, what it means)
ENERGY_SOURCES = {
    "estimated": ("est.", "estimated (profile power x time): the hardware profile's power_w x the measured decode time, not metered"),
    "rapl": ("RAPL", "measured by the CPU package energy counters (RAPL)"),
    "nvml": ("NVML", "measured by the GPU energy counter (NVML)"),
}
_UNKNOWN_ENERGY = ("?", "source not recorded (results written before energy_source existed): may be estimated from the profile's power")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def energy_source(run: dict) -> tuple[str, str]:
    """(mark, meaning) of how the run's ``energy_j_per_token`` was obtained."""
    src = (run.get("metrics") or {}).get("energy_source")
    return ENERGY_SOURCES.get(str(src).lower(), _UNKNOWN_ENERGY) if src is not None else _UNKNOWN_ENERGY


def fidelity_measured(run: dict, key: str, runs: list[dict] | None = None) -> bool:
    """Whether ``run``'s fidelity metric ``key`` (top1_agreement, kl_to_baseline) is a measurement.

    A run compared against a reference records ``details.fidelity_tokens``. The baseline gets
    1.0 / 0.0 by definition without one: shown only when it is the reference of another run in
    the same results that has the metric (a lone ``leanfm eval`` run was compared with nothing)."""
    if key not in FIDELITY:
        return True
    if "fidelity_tokens" in (run.get("details") or {}):
        return True
    if (run.get("recipe") or {}).get("steps"):  # a compressed run without the detail: older results, trust the value
        return True
    if runs is None:
        return True
    return any(r is not run and (r.get("recipe") or {}).get("steps") and _number((r.get("metrics") or {}).get(key)) for r in runs)


def cell(metrics: dict, key: str, fmt, run: dict | None = None, runs: list[dict] | None = None) -> str:
    """The text of one table cell: ``–`` for a metric that was not measured (absent, null, NaN, or a
    fidelity value with nothing compared, see :func:`fidelity_measured`); a J/token value carries
    how it was obtained (``est.`` = estimated from the profile's power x time, ``RAPL``/``NVML`` =
    metered; :func:`footnotes` explains)."""
    v = metrics.get(key)
    if v is None or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if run is not None and not fidelity_measured(run, key, runs):
        return MISSING
    if not _number(v):
        text = str(v)  # a non-number (hand-edited file): shown as is, never a crash
    else:
        try:
            text = fmt(v)
        except (TypeError, ValueError):
            text = str(v)
    if key == "energy_j_per_token" and run is not None:
        text += f" {energy_source(run)[0]}"
    if key == "speedup" and run is not None and (run.get("flags") or {}).get("noisy"):
        text += " noisy"  # the reason is in the execution column and results.json
    return text


def present_columns(runs: list[dict]) -> list[tuple]:
    """The COLUMNS at least one run shows a value in (a column of nothing but ``–`` is left out)."""
    return [c for c in COLUMNS if any(cell(r.get("metrics") or {}, c[0], c[2], r, runs) != MISSING for r in runs)]


def footnotes(results: dict) -> list[str]:
    """Lines printed under the table (terminal and report.html): how J/token was obtained."""
    runs = [r for r in results.get("runs") or [] if _number((r.get("metrics") or {}).get("energy_j_per_token"))]
    if not runs:
        return []
    by_mark: dict[str, tuple[str, list[str]]] = {}
    for r in runs:
        mark, meaning = energy_source(r)
        by_mark.setdefault(mark, (meaning, []))[1].append(str((r.get("recipe") or {}).get("name", "?")))
    prof = results.get("hardware_profile") or {}
    power = f" ({prof.get('name', 'profile')}: {prof['power_w']:g} W)" if _number(prof.get("power_w")) else ""
    lines = []
    for mark, (meaning, names) in by_mark.items():
        who = "all runs" if len(names) == len(runs) else ", ".join(names)
        lines.append(f"J/token {mark} = {meaning}{power if mark == 'est.' else ''} [{who}]")
    return lines


def flag_text(run: dict) -> str:
    f = run.get("flags") or {}
    status = run.get("status")
    if status == "timing":
        return "interrupted before its speed was measured (other metrics kept)"
    if status != "ok":
        return f"error: {run.get('error', '')}"
    text = ("simulated" if f.get("simulated") else "real") + f" · {f.get('kernel', '?')}"
    return text + (f" · NOISY: {f['noisy_reason']}" if f.get("noisy_reason") else "")
