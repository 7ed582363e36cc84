"""Money and CO2 per million generated tokens from a hardware profile (YAML, sources inside)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..errors import LeanfmError

_REQUIRED = ("power_w", "usd_per_hour", "grid_gco2_per_kwh")


def load_profile(path: str | None = None) -> dict:
    if path is None:
        text = resources.files("leanfm.hardware").joinpath("local.yaml").read_text()
        src = "builtin:local.yaml"
    else:
        p = Path(path)
        if not p.is_file():
            raise LeanfmError(f"hardware profile '{path}' not found; pass a YAML file with keys {', '.join(_REQUIRED)}")
        text, src = p.read_text(), str(p)
    try:
        prof = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LeanfmError(f"hardware profile {src} is not valid YAML: {str(e).splitlines()[0]}") from None
    missing = [k for k in _REQUIRED if not isinstance(prof.get(k), (int, float))]
    if missing:
        raise LeanfmError(f"hardware profile {src} lacks numeric '{missing[0]}' (needs {', '.join(_REQUIRED)})")
    prof["source"] = src
    return prof


def cost_metrics(decode_tokens_per_s: float | None, energy_j_per_token: float | None, profile: dict) -> dict:
    out = {}
    if decode_tokens_per_s:
        out["usd_per_million_tokens"] = profile["usd_per_hour"] / 3600.0 / decode_tokens_per_s * 1e6
    if energy_j_per_token is not None:
        kwh_per_million = energy_j_per_token * 1e6 / 3.6e6
        out["co2_g_per_million_tokens"] = kwh_per_million * profile["grid_gco2_per_kwh"]
    return out
