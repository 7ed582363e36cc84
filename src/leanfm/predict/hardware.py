"""Hardware profiles: load, validate, look up rates and kernels. The one loader and schema for
the roofline predictor and for ``leanfm bench`` (energy, money, CO2, ``roofline_fraction``).

A profile is a YAML file (``leanfm/hardware/profiles/*.yaml``, plus ``hardware/local.yaml`` for
the machine leanfm runs on) with these keys; the first eight are required::

    name: h100-sxm                 # canonical name
    kind: gpu                      # gpu | cpu | mobile-soc | sbc
    memory_gb: 80
    memory_bandwidth_gbps: 3350    # GB/s (1e9 bytes per second)
    peak_tflops: {fp32: 67, bf16: 989.4, ...}   # dense rates per dtype, fp32 required
    power_w: 700
    usd_per_hour: 2.99
    grid_gco2_per_kwh: 480
    aliases: [h100]                # optional
    compute_capability: 9.0        # optional, NVIDIA GPUs (kernels.yaml requirements)
    default_dtype: bf16            # optional, dtype of dense weights when a format has no kernel
    backends: [cuda, vllm]         # optional
    kernels: {fp8: null}           # optional overrides of kernels.yaml entries for this device
    peak_gflops_fp32: 160          # optional, GFLOP/s: the flat fp32 rate a measured step's
                                   #   roofline_fraction uses (roofline.measured_step)

Pass a name (case-insensitive, aliases allowed) or the path of your own YAML file.
"""
from __future__ import annotations

import copy
import functools
import math
from importlib import resources
from pathlib import Path

import yaml

from ..errors import LeanfmError

KINDS = ("gpu", "cpu", "mobile-soc", "sbc")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4")
REQUIRED = ("name", "kind", "memory_gb", "memory_bandwidth_gbps", "peak_tflops", "power_w", "usd_per_hour",
            "grid_gco2_per_kwh")
_POSITIVE = ("memory_gb", "memory_bandwidth_gbps")
_OPTIONAL_POSITIVE = ("peak_gflops_fp32",)
_NON_NEGATIVE = ("power_w", "usd_per_hour", "grid_gco2_per_kwh")
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float8": "fp8", "e4m3": "fp8", "float8_e4m3fn": "fp8"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(text: str, src: str) -> dict:
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise LeanfmError(f"hardware file {src} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LeanfmError(f"hardware file {src} must hold a mapping of keys (name, kind, peak_tflops, ...)")
    return data


@functools.lru_cache(maxsize=None)
def _builtin() -> dict[str, tuple[str, str]]:
    """Canonical name -> (YAML text, source label) for every built-in profile, ``local`` included."""
    root = resources.files("leanfm.hardware")
    files = [root.joinpath("local.yaml")]
    files += sorted((f for f in root.joinpath("profiles").iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    out = {}
    for f in files:
        text = f.read_text()
        name = str(_read_yaml(text, f.name).get("name", "")).lower()
        out[name] = (text, f"builtin:{'' if f.name == 'local.yaml' else 'profiles/'}{f.name}")
    return out


@functools.lru_cache(maxsize=None)
def _aliases() -> dict[str, str]:
    """Lower-case name or alias -> canonical name."""
    table: dict[str, str] = {}
    for name, (text, src) in _builtin().items():
        for key in [name, *(str(a).lower() for a in _read_yaml(text, src).get("aliases") or [])]:
            if table.get(key, name) != name:
                raise LeanfmError(f"hardware alias '{key}' is claimed by both {table[key]} and {name}")
            table[key] = name
    return table


def known_hardware() -> list[str]:
    """Canonical names of the built-in profiles, sorted (``local`` included)."""
    return sorted(_builtin())


def known_hardware_text() -> str:
    """``a100-80gb (a100, a100-sxm), apple-m3 (...), ...``: every built-in name with its aliases."""
    by_name: dict[str, list[str]] = {n: [] for n in known_hardware()}
    for alias, name in sorted(_aliases().items()):
        if alias != name:
            by_name[name].append(alias)
    return ", ".join(f"{n} ({', '.join(a)})" if a else n for n, a in by_name.items())


def _number(prof: dict, key: str, src: str, positive: bool) -> None:
    v = prof[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        raise LeanfmError(f"hardware file {src}: '{key}' must be a {'positive' if positive else 'non-negative'} number, got {v!r}")


def validate(prof: dict, src: str) -> dict:
    """Check a parsed profile; return it with defaults filled (``aliases``, ``backends``, ``default_dtype``)."""
    for key in REQUIRED:
        if key not in prof or prof[key] is None:
            raise LeanfmError(f"hardware file {src} lacks '{key}' (required: {', '.join(REQUIRED)})")
    prof["name"] = str(prof["name"])
    if prof["kind"] not in KINDS:
        raise LeanfmError(f"hardware file {src}: kind '{prof['kind']}' is not one of {', '.join(KINDS)}")
    for key in _POSITIVE:
        _number(prof, key, src, positive=True)
    for key in _NON_NEGATIVE:
        _number(prof, key, src, positive=False)
    for key in _OPTIONAL_POSITIVE:
        if key in prof:
            _number(prof, key, src, positive=True)
    peaks = prof["peak_tflops"]
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        raise LeanfmError(f"hardware file {src}: 'peak_tflops' must map dtypes to TFLOP/s and include fp32")
    for dtype, v in peaks.items():
        if dtype not in DTYPES:
            raise LeanfmError(f"hardware file {src}: peak_tflops has unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
        _number(peaks, dtype, src, positive=True)
    prof["aliases"] = [str(a) for a in prof.get("aliases") or []]
    prof["backends"] = [str(b) for b in prof.get("backends") or []]
    prof.setdefault("default_dtype", "fp32")
    if prof["default_dtype"] not in peaks:
        raise LeanfmError(f"hardware file {src}: default_dtype '{prof['default_dtype']}' has no peak_tflops rate")
    return prof


def read_profile(name_or_path: str) -> dict:
    """Load and validate a profile by name, alias or YAML path, as written (nominal rates);
    ``profile["source"]`` says where it came from."""
    key = str(name_or_path).strip()
    path = Path(key).expanduser()
    canonical = None
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise LeanfmError(f"hardware profile file '{key}' not found")
        src = str(path)
        prof = _read_yaml(path.read_text(), src)
    else:
        canonical = _aliases().get(key.lower())
        if canonical is None:
            raise LeanfmError(f"unknown hardware '{key}'; known: {known_hardware_text()} (or pass a YAML file)")
        text, src = _builtin()[canonical]
        prof = _read_yaml(text, src)
    prof = validate(prof, src)
    prof["source"] = src
    if canonical is not None and key.lower() != canonical:
        prof["requested"] = key  # an alias: what the user typed, so output can say what it resolved to
    return prof


def load_hardware(name_or_path: str, calibrated: bool = True, threads: int = 2) -> dict:
    """:func:`read_profile`, plus for ``local`` with ``calibrated=True`` the cached
    micro-benchmark of this machine (:func:`leanfm.predict.calibrate.calibrate_local` at
    ``threads``) in place of the nominal rates when one exists for the current CPU and torch;
    ``profile["calibrated"]`` says whether it did. Loading never runs the benchmark itself.
    """
    prof = read_profile(name_or_path)
    prof["calibrated"] = False
    if prof["name"] == "local" and calibrated:
        from .calibrate import overlay_cached

        prof = overlay_cached(prof, threads)
    return prof


def predict_on_local(threads: int, price) -> dict:
    """``price(profile)`` on ``local`` with its calibration for ``threads``, plus ``calibrated`` and
    ``threads``; ``{"error": ...}`` when it refuses (what ``leanfm bench`` stores beside a run)."""
    try:
        hw = load_hardware("local", threads=threads)
        out = price(hw)
    except LeanfmError as e:
        return {"error": str(e)}
    return {**out, "calibrated": bool(hw.get("calibrated", False)), "threads": threads}


def peak_flops(profile: dict, dtype: str) -> float:
    """Dense peak rate of ``profile`` for ``dtype`` in FLOP/s (integer dtypes: OP/s)."""
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    rate = profile["peak_tflops"].get(d)
    if not rate:
        has = ", ".join(profile["peak_tflops"])
        raise LeanfmError(f"{profile['name']} has no {dtype} math (has: {has}); pick another format or hardware")
    return float(rate) * 1e12


# --- kernels.yaml ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _kernels_text() -> str:
    return resources.files("leanfm.hardware").joinpath("kernels.yaml").read_text()


def kernel_table() -> dict:
    """The parsed ``kernels.yaml``: ``{format: {"description": ..., "kernels": [entry, ...]}}``."""
    data = yaml.load(_kernels_text(), Loader=_LOADER)
    return data["formats"]


def known_formats() -> list[str]:
    return list(kernel_table())


_ENTRY_DEFAULTS = {"dequant_overhead": 0.0, "flops_factor": 1.0, "index_bits_per_kept_weight": 0,
                   "faster_than_dense": True, "backends": [], "note": "", "sources": []}


def _matches(entry: dict, profile: dict) -> bool:
    if entry["compute_dtype"] not in profile["peak_tflops"]:
        return False
    need = entry.get("min_compute_capability")
    return need is None or float(profile.get("compute_capability") or 0) >= float(need)


def kernel_info(fmt: str, profile: dict) -> dict | None:
    """The kernel ``profile`` has for weight format ``fmt``, or None (no real kernel: simulated).

    Returns the kernels.yaml entry with defaults filled, plus ``format`` and ``matched``
    (``"profile"``, ``"device"`` or ``"kind"``: what selected it).
    """
    table = kernel_table()
    key = str(fmt).lower()
    if key not in table:
        raise LeanfmError(f"unknown weight format '{fmt}'; known: {', '.join(table)}")
    overrides = profile.get("kernels") or {}
    if key in overrides:
        entry, matched = overrides[key], "profile"
        if entry is None:
            return None
        if "compute_dtype" not in entry:
            raise LeanfmError(f"hardware {profile['name']}: kernels.{key} lacks 'compute_dtype'")
    else:
        entries = table[key]["kernels"]
        by_device = [e for e in entries if profile["name"] in e["where"]]
        by_kind = [e for e in entries if profile["kind"] in e["where"]]
        found = [(e, "device") for e in by_device if _matches(e, profile)] + [(e, "kind") for e in by_kind if _matches(e, profile)]
        if not found:
            return None
        entry, matched = found[0]
    out = {**copy.deepcopy(_ENTRY_DEFAULTS), **copy.deepcopy(entry)}
    out.update(format=key, matched=matched)
    return out


def profile_summary(profile: dict) -> str:
    """One line for CLI output: name, memory, bandwidth, rates, cost."""
    rates = ", ".join(f"{d} {_fmt(v)}" for d, v in profile["peak_tflops"].items())
    cal = " (calibrated)" if profile.get("calibrated") else ""
    return (f"{profile['name']}{cal}: {profile.get('description', profile['kind'])}; {_fmt(profile['memory_gb'])} GB, "
            f"{_fmt(profile['memory_bandwidth_gbps'])} GB/s, TFLOP/s {rates}; {_fmt(profile['power_w'])} W, "
            f"{_fmt(profile['usd_per_hour'])} USD/h")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


# --- the profile list (``leanfm hardware``) -----------------------------------------------------

HARDWARE_COLUMNS = ("name", "aliases", "kind", "memory_gb", "memory_bandwidth_gbps", "peak_tflops", "power_w", "usd_per_hour",
                    "grid_gco2_per_kwh", "source")


def hardware_rows() -> list[dict]:
    """One dict per built-in profile (``local`` included, nominal rates), sorted by name, with the
    keys of :data:`HARDWARE_COLUMNS`: ``aliases`` a list, ``peak_tflops`` a dtype -> TFLOP/s dict,
    ``source`` the file it came from (``builtin:profiles/h100-sxm.yaml``)."""
    rows = []
    for name in known_hardware():
        p = read_profile(name)
        rows.append({k: copy.deepcopy(p[k]) for k in HARDWARE_COLUMNS})
    return rows


def print_hardware(console=None, as_json: bool = False) -> None:
    """Print every built-in profile: a table on ``console`` (a rich Console; default: stdout), or,
    with ``as_json``, the :func:`hardware_rows` list as JSON on stdout (or through ``console``)."""
    import json

    rows = hardware_rows()
    if as_json:
        text = json.dumps(rows, indent=2)
        if console is None:
            print(text)
        else:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 220))
    t = Table(title="leanfm hardware profiles (--hardware NAME or alias, or a YAML file with the same keys)")
    for header, justify in (("name", "left"), ("aliases", "left"), ("kind", "left"), ("memory GB", "right"),
                            ("bandwidth GB/s", "right"), ("peak TFLOPS", "left"), ("power W", "right"), ("$/hour", "right"),
                            ("gCO2/kWh", "right"), ("source", "left")):
        t.add_column(header, justify=justify, overflow="fold")
    for r in rows:
        t.add_row(r["name"], ", ".join(r["aliases"]) or "-", r["kind"], _fmt(r["memory_gb"]), _fmt(r["memory_bandwidth_gbps"]),
                  ", ".join(f"{d} {_fmt(v)}" for d, v in r["peak_tflops"].items()), _fmt(r["power_w"]),
                  f"{r['usd_per_hour']:.4g}", _fmt(r["grid_gco2_per_kwh"]), r["source"])
    console.print(t)
