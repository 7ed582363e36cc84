"""Money and CO2 per million generated tokens from a hardware profile (YAML, sources inside)."""
from __future__ import annotations

from ..predict.hardware import read_profile


def load_profile(path: str | None = None) -> dict:
    """The profile ``leanfm bench`` measures against: the built-in ``local`` (nominal rates) or
    ``path``, in the one schema :func:`leanfm.predict.hardware.read_profile` validates."""
    return read_profile("local" if path is None else path)


def cost_metrics(decode_tokens_per_s: float | None, energy_j_per_token: float | None, profile: dict) -> dict:
    out = {}
    if decode_tokens_per_s:
        out["usd_per_million_tokens"] = profile["usd_per_hour"] / 3600.0 / decode_tokens_per_s * 1e6
    if energy_j_per_token is not None:
        kwh_per_million = energy_j_per_token * 1e6 / 3.6e6
        out["co2_g_per_million_tokens"] = kwh_per_million * profile["grid_gco2_per_kwh"]
    return out
