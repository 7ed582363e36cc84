"""Hardware profiles, kernel table and the local calibration (tiny sizes, temporary cache)."""
from __future__ import annotations

import json
import math
import time

import pytest
import yaml

from leanfm.errors import LeanfmError
from leanfm.measure.cost import load_profile
from leanfm.predict import calibrate, known_hardware, load_hardware
from leanfm.predict.hardware import (DTYPES, KINDS, kernel_info, kernel_table, known_formats, peak_flops,
                                     profile_summary)

EXPECTED = {"h100-sxm", "h200", "a100-80gb", "l4", "rtx-4090", "apple-m3", "snapdragon-8-gen-3", "raspberry-pi-5", "local"}
FORMATS = {"fp32", "bf16", "fp16", "w8a16", "w4a16", "w8a8", "fp8", "2:4-sparse", "unstructured-sparse"}


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Every test sees an empty leanfm cache, so no real calibration leaks in."""
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_profile_loads_and_validates():
    names = known_hardware()
    assert names == sorted(names) and EXPECTED <= set(names)
    for name in names:
        p = load_hardware(name)
        assert p["name"] == name and p["kind"] in KINDS
        assert p["peak_tflops"]["fp32"] > 0 and set(p["peak_tflops"]) <= set(DTYPES)
        assert p["default_dtype"] in p["peak_tflops"]
        assert p["sources"] and p["backends"]
        line = profile_summary(p)
        assert "\n" not in line and name in line


def test_aliases_resolve_case_insensitively():
    pairs = {"h100": "h100-sxm", "A100": "a100-80gb", "rtx4090": "rtx-4090", "m3": "apple-m3",
             "pi5": "raspberry-pi-5", "RPI5": "raspberry-pi-5", "Local": "local", "H200": "h200"}
    for alias, name in pairs.items():
        assert load_hardware(alias)["name"] == name


def test_loading_is_fast():
    load_hardware("h100")
    t0 = time.perf_counter()
    for name in known_hardware():
        load_hardware(name)
    assert time.perf_counter() - t0 < 0.1


def test_local_keeps_the_keys_cost_and_roofline_read():
    prof = load_profile()  # measure/cost.py, builtin local.yaml
    for key in ("power_w", "usd_per_hour", "grid_gco2_per_kwh", "peak_gflops_fp32", "memory_bandwidth_gbps"):
        assert isinstance(prof[key], (int, float))
    local = load_hardware("local", calibrated=False)
    assert local["kind"] == "cpu" and local["memory_gb"] == 24 and "fp8" not in local["peak_tflops"]
    assert local["calibrated"] is False


def test_unknown_hardware_lists_known_names():
    with pytest.raises(LeanfmError) as e:
        load_hardware("xyz")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown hardware 'xyz'; known: ")
    assert all(name in msg for name in known_hardware()) and msg.endswith("(or pass a YAML file)")
    assert "h100-sxm (h100, h100-sxm5)" in msg and "raspberry-pi-5 (pi5, raspberry-pi5, rpi5)" in msg  # aliases beside names


@pytest.mark.parametrize("asked,resolved", [("h100", "h100-sxm"), ("RPI5", "raspberry-pi-5"), ("this", "local")])
def test_alias_records_what_was_asked(asked, resolved):
    p = load_hardware(asked)
    assert p["name"] == resolved and p["requested"] == asked


@pytest.mark.parametrize("asked", ["h100-sxm", "H100-SXM", "local"])
def test_canonical_name_records_no_request(asked, tmp_path):
    assert "requested" not in load_hardware(asked)


def test_yaml_path_records_no_request(tmp_path):
    p = _write(tmp_path, {**yaml.safe_load(_profile_text("l4")), "name": "my-gpu"})
    assert "requested" not in load_hardware(str(p))


def test_hardware_rows_list_every_profile():
    from leanfm.predict.hardware import HARDWARE_COLUMNS, hardware_rows

    rows = hardware_rows()
    assert [r["name"] for r in rows] == known_hardware()
    for r in rows:
        assert tuple(r) == HARDWARE_COLUMNS
        prof = load_hardware(r["name"], calibrated=False)
        for key in ("kind", "memory_gb", "memory_bandwidth_gbps", "peak_tflops", "power_w", "usd_per_hour", "grid_gco2_per_kwh"):
            assert r[key] == prof[key], (r["name"], key)
        assert r["source"].startswith("builtin:") and r["source"].endswith(".yaml")
        assert isinstance(r["aliases"], list)
    h100 = next(r for r in rows if r["name"] == "h100-sxm")
    assert "h100" in h100["aliases"] and h100["memory_gb"] == 80 and h100["peak_tflops"]["bf16"] > 900
    json.dumps(rows)


@pytest.mark.parametrize("as_json", [False, True])
def test_print_hardware(as_json, capsys):
    import io

    from rich.console import Console

    from leanfm.predict.hardware import hardware_rows, print_hardware

    print_hardware(as_json=as_json)
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out) == hardware_rows()
    else:
        for header in ("name", "aliases", "kind", "memory GB", "bandwidth GB/s", "peak TFLOPS", "power W", "$/hour", "gCO2/kWh", "source"):
            assert header in out
        for name in known_hardware():
            assert name in out
        assert "builtin:profiles/raspberry-pi-5.yaml" in out and "pi5" in out
    buf = io.StringIO()
    print_hardware(Console(file=buf, width=250), as_json=as_json)
    text = buf.getvalue()
    assert ("raspberry-pi-5" in text) and (json.loads(text) == hardware_rows() if as_json else "memory GB" in text)


def _write(tmp_path, prof: dict, name: str = "dev.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(prof))
    return p


def test_yaml_path_and_missing_field(tmp_path):
    base = yaml.safe_load(_profile_text("l4"))
    ok = _write(tmp_path, {**base, "name": "my-gpu", "aliases": []})
    assert load_hardware(str(ok))["name"] == "my-gpu"
    for field in ("memory_bandwidth_gbps", "peak_tflops", "grid_gco2_per_kwh"):
        bad = _write(tmp_path, {k: v for k, v in base.items() if k != field}, f"no-{field}.yaml")
        with pytest.raises(LeanfmError) as e:
            load_hardware(str(bad))
        assert f"'{field}'" in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    wrong = _write(tmp_path, {**base, "peak_tflops": {"bf16": 10}}, "nofp32.yaml")
    with pytest.raises(LeanfmError, match="fp32"):
        load_hardware(str(wrong))
    with pytest.raises(LeanfmError, match="not found"):
        load_hardware(str(tmp_path / "absent.yaml"))


def _profile_text(name: str) -> str:
    from importlib import resources

    return resources.files("leanfm.hardware").joinpath("profiles", f"{name}.yaml").read_text()


def test_peak_flops_and_missing_dtype():
    h100 = load_hardware("h100")
    assert peak_flops(h100, "bf16") == pytest.approx(989.4e12)
    assert peak_flops(h100, "bfloat16") == peak_flops(h100, "bf16")
    local = load_hardware("local", calibrated=False)
    with pytest.raises(LeanfmError) as e:
        peak_flops(local, "fp8")
    assert str(e.value) == "local has no fp8 math (has: fp32, bf16, int8); pick another format or hardware"


def test_kernel_table_refers_to_real_devices_and_dtypes():
    table = kernel_table()
    assert FORMATS <= set(table) and set(known_formats()) == set(table)
    names = set(known_hardware())
    for fmt, spec in table.items():
        assert spec["description"]
        for entry in spec["kernels"]:
            for where in entry["where"]:
                assert where in KINDS or where in names, (fmt, where)
            assert entry["compute_dtype"] in DTYPES and entry["backends"] and entry["note"]
            assert entry["dequant_overhead"] >= 0
            ff = entry.get("flops_factor", 1.0)
            assert ff == "density" or 0 < ff <= 1
    # Every device resolves every format to a kernel whose compute dtype it has, or to None.
    for name in names:
        prof = load_hardware(name)
        for fmt in table:
            info = kernel_info(fmt, prof)
            assert info is None or info["compute_dtype"] in prof["peak_tflops"]


def test_kernel_lookups():
    h100, a100, local = load_hardware("h100"), load_hardware("a100"), load_hardware("local", calibrated=False)
    assert kernel_info("w4a16", h100)["compute_dtype"] == "fp16"
    assert kernel_info("w4a16", local)["backends"][0] == "cpp-int4"
    assert kernel_info("w4a16", local)["compute_dtype"] == "fp32"
    assert kernel_info("w8a8", h100)["compute_dtype"] == "int8"
    assert kernel_info("fp8", h100)["compute_dtype"] == "fp8"
    assert kernel_info("fp8", a100)["compute_dtype"] == "fp16"   # weight-only FP8 Marlin on Ampere
    assert kernel_info("fp8", local) is None                      # simulated
    assert kernel_info("2:4-sparse", h100)["flops_factor"] == 0.5
    assert kernel_info("2:4-sparse", load_hardware("pi5")) is None
    assert kernel_info("unstructured-sparse", h100) is None
    assert kernel_info("unstructured-sparse", local)["faster_than_dense"] is False
    with pytest.raises(LeanfmError, match="unknown weight format"):
        kernel_info("w3a3", h100)


def test_custom_gpu_without_compute_capability_or_fp8(tmp_path):
    base = yaml.safe_load(_profile_text("l4"))
    old = {k: v for k, v in base.items() if k != "compute_capability"}
    old.update(name="old-gpu", aliases=[], default_dtype="fp16", peak_tflops={"fp32": 14, "fp16": 112})
    prof = load_hardware(str(_write(tmp_path, old)))
    assert kernel_info("fp16", prof)["matched"] == "kind"
    assert kernel_info("w4a16", prof) is None and kernel_info("fp8", prof) is None
    old["kernels"] = {"w4a16": {"backends": ["mine"], "compute_dtype": "fp16", "dequant_overhead": 0.2}, "fp16": None}
    prof = load_hardware(str(_write(tmp_path, old, "override.yaml")))
    assert kernel_info("w4a16", prof)["backends"] == ["mine"] and kernel_info("fp16", prof) is None


# --- calibration -----------------------------------------------------------------------------

def test_calibration_tiny_runs_caches_and_is_finite(tmp_cache, monkeypatch):
    calls = []
    real = calibrate._measure
    monkeypatch.setattr(calibrate, "_measure", lambda *a: calls.append(a) or real(*a))
    first = calibrate.calibrate_local(threads=1, sizes=calibrate.TINY)
    assert first["cached"] is False and len(calls) == 1
    r = first["results"]
    values = [*r["peak_tflops"].values()] + [v for k, v in r.items() if isinstance(v, (int, float))]
    values += [v for row in r["gemv_grid"]["gbps"] for v in row] + [v for pt in r["gemm_fp32_curve"] for v in pt]
    values += [v for pt in r["gemm_dram_slowdown"] for v in pt]
    assert len(r["gemv_grid"]["gbps"]) == len(calibrate.TINY.gemv_grid_in) and len(r["gemm_fp32_curve"]) == 2
    assert r["gemm_dram_slowdown"][0] == [1.0, 1.0] and [pt[0] for pt in r["gemm_dram_slowdown"]] == [1.0, 4.0]
    assert {"fp32", "bf16"} <= set(r["peak_tflops"]) and all(math.isfinite(v) and v > 0 for v in values)
    for key in ("memory_bandwidth_gbps", "stream_read_gbps", "overhead_us_per_op", "overhead_us_per_layer",
                "overhead_us_per_model_step", "gemm_dram_slowdown"):
        assert key in r and key in first["method"]
    path = tmp_cache / "hardware" / "local-t1.json"
    assert path.exists() and json.loads(path.read_text())["key"]["threads"] == 1
    second = calibrate.calibrate_local(threads=1, sizes=calibrate.TINY)
    assert second["cached"] is True and len(calls) == 1 and second["results"] == r
    calibrate.calibrate_local(threads=1, sizes=calibrate.TINY, force=True)
    assert len(calls) == 2


def _fake_measure(threads, sizes):
    return {"results": {"peak_tflops": {"fp32": 0.1, "bf16": 0.001, "int8": 0.002}, "memory_bandwidth_gbps": 15.0,
                        "stream_read_gbps": 12.0, "overhead_us_per_op": 5.0, "overhead_us_per_layer": 400.0,
                        "overhead_us_per_model_step": 300.0,
                        "gemv_grid": {"in_features": [512], "mib": [4], "gbps": [[14.0]]}, "gemm_fp32_curve": [[128, 1.2e11]],
                        "gemm_dram_slowdown": [[1, 1.0], [4, 2.0]], "conv_weight_gbps": 1.5},
            "method": {"peak_tflops.fp32": "fake"}}


def test_calibration_overlays_local_and_invalidates_on_key_change(tmp_cache, monkeypatch):
    monkeypatch.setattr(calibrate, "_measure", _fake_measure)
    assert load_hardware("local")["calibrated"] is False          # nothing cached: nominal rates
    summary = calibrate.calibrate_cli(threads=2)
    assert "fp32 100" in summary and "15.0 GB/s" in summary
    prof = load_hardware("local")
    assert prof["calibrated"] is True and prof["memory_bandwidth_gbps"] == 15.0
    assert prof["peak_tflops"]["fp32"] == 0.1 and prof["peak_gflops_fp32"] == pytest.approx(100)
    assert prof["overhead_us_per_layer"] == 400.0 and "(calibrated)" in profile_summary(prof)
    assert prof["conv_weight_gbps"] == 1.5 and "1.50 GB/s of weights" in summary
    assert peak_flops(prof, "fp32") == pytest.approx(1e11)
    assert load_hardware("local", calibrated=False)["memory_bandwidth_gbps"] == 27
    assert load_hardware("local", threads=1)["calibrated"] is False  # other thread count: no cache
    monkeypatch.setattr(calibrate, "cpu_model", lambda: "another CPU")
    assert load_hardware("local")["calibrated"] is False          # stale: different machine
    assert calibrate.read_cache(2) is None


@pytest.mark.parametrize("as_json", [False, True])
def test_hardware_subcommand_entry_points(as_json, capsys):
    """What ``leanfm hardware [--json]`` wires: cli_predict.add_hardware_arguments + run_hardware."""
    import argparse

    from leanfm.predict.cli_predict import add_hardware_arguments, run_hardware
    from leanfm.predict.hardware import hardware_rows

    p = argparse.ArgumentParser(prog="leanfm hardware")
    add_hardware_arguments(p)
    assert run_hardware(p.parse_args(["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out) == hardware_rows()
    else:
        assert "h100-sxm" in out and "peak TFLOPS" in out
