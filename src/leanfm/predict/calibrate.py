"""Micro-benchmarks of this machine for the ``local`` hardware profile, cached as JSON.

``calibrate_local(threads)`` measures, on ``threads`` torch threads (restored afterwards):

- ``peak_tflops``: GEMM throughput in fp32, bf16 and int8 (``torch._int_mm``);
- ``memory_bandwidth_gbps``: the effective read rate of an fp32 GEMV over a matrix far larger
  than the caches (what one decode step of a dense model sees), and ``stream_read_gbps`` (a
  plain reduction over the same matrix) for reference;
- ``overhead_us_per_op``: the fixed cost of one tiny ``F.linear``;
- ``overhead_us_per_layer`` / ``overhead_us_per_model_step``: decode-step time of tiny random
  Llama models with 1 and 3 decoder layers (hidden 64, so the math is negligible):
  per layer = (t3 - t1) / 2, per model step = t1 - per layer;
- ``gemm_dram_slowdown``: how much longer a matmul of a few rows takes than the one-row GEMV over
  the same weights read from DRAM (a batched decode step): the GEMM path does not stream its
  weights as well as the GEMV path (1.7-2.9x at 2-16 rows measured on AVX2 EPYC with MKL);
- ``conv_weight_gbps``: the rate at which an eager fp32 convolution gets through its weights when
  its arithmetic is negligible (a 3x3 convolution of many channels on a 1x1 map): oneDNN brings
  the weights into its blocked layout on every eager call, a fixed cost per weight byte that a
  UNet's deep blocks (large kernels on small maps) pay in full (~1.5 GB/s measured on AVX2 EPYC,
  20x slower than streaming the same bytes).

The result lives in ``cache_root()/hardware/local-t{threads}.json`` and is reused until the
torch version, CPU model, thread count or benchmark sizes change (or ``force=True``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import statistics
import time
from pathlib import Path

from ..models.cache import cache_root
from ..sysinfo import cpu_model

SCHEMA = 4  # 2: gemv_grid and gemm_fp32_curve; 3: gemm_dram_slowdown; 4: conv_weight_gbps


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Benchmark sizes. The defaults take ~10-30 s on 2 threads; tests use :data:`TINY`."""

    gemm_fp32: tuple[int, int, int] = (512, 2048, 2048)   # [M, K] @ [K, N]
    gemm_bf16: tuple[int, int, int] = (64, 512, 512)      # bf16 is slow on CPUs without AMX
    gemm_int8: tuple[int, int, int] = (64, 512, 512)
    gemv_mb: int = 256                                    # fp32 matrix read per GEMV, MiB
    gemv_in: int = 4096
    repeats: int = 7
    op_calls: int = 2000                                  # tiny F.linear calls per timed batch
    decode_prompt: int = 128                              # KV-cache length the decode steps see
    decode_steps: int = 16                                # timed steps per round and model
    decode_rounds: int = 5                                # interleaved 1-layer/3-layer rounds
    gemv_grid_in: tuple[int, ...] = (512, 1024, 2048, 4096)  # GEMV row lengths (in_features)
    gemv_grid_mb: tuple[float, ...] = (0.5, 4, 64)       # GEMV matrix sizes, MiB
    gemv_pool_mb: int = 256                               # distinct matrices cycled, so reads come from DRAM
    gemm_curve_rows: tuple[int, ...] = (2, 8, 32, 128, 512, 2048)  # M of [M x 1024] @ [1024 x 1024]
    gemm_curve_kn: int = 1024
    dram_rows: tuple[int, ...] = (2, 4, 8, 16, 64)        # rows of the batched matmuls from DRAM
    dram_shapes: tuple[tuple[int, int], ...] = ((512, 2048), (1024, 1024), (2048, 512))  # (in, out), 4 MiB each
    conv_channels: int = 1280                             # C_in = C_out of the 3x3 convolution on a 1x1 map


TINY = Sizes(gemm_fp32=(64, 256, 256), gemm_bf16=(16, 64, 64), gemm_int8=(32, 64, 64), gemv_mb=4, gemv_in=512,
             repeats=3, op_calls=50, decode_prompt=16, decode_steps=4, decode_rounds=2,
             gemv_grid_in=(64, 128), gemv_grid_mb=(0.25, 1), gemv_pool_mb=4, gemm_curve_rows=(2, 16), gemm_curve_kn=128,
             dram_rows=(4,), dram_shapes=((128, 256),), conv_channels=64)


def cache_path(threads: int) -> Path:
    return cache_root() / "hardware" / f"local-t{threads}.json"


def _key(threads: int, sizes: Sizes) -> dict:
    """What a cached result depends on; a mismatch means measure again."""
    return {"torch": importlib.metadata.version("torch"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": threads, "sizes": json.loads(json.dumps(dataclasses.asdict(sizes)))}


def read_cache(threads: int, sizes: Sizes = Sizes()) -> dict | None:
    """The cached calibration if it matches this machine, torch, threads and sizes, else None."""
    p = cache_path(threads)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if data.get("schema") != SCHEMA or data.get("key") != _key(threads, sizes):
        return None
    return data


def overlay_cached(profile: dict, threads: int = 2) -> dict:
    """Replace the nominal rates of the ``local`` profile with the cached calibration, if any."""
    data = read_cache(threads)
    if data is None:
        return profile
    r = data["results"]
    profile["peak_tflops"] = {**profile["peak_tflops"], **r["peak_tflops"]}
    profile["peak_gflops_fp32"] = r["peak_tflops"]["fp32"] * 1e3  # key read by roofline.measured_step
    for k in ("memory_bandwidth_gbps", "stream_read_gbps", "overhead_us_per_op", "overhead_us_per_layer",
              "overhead_us_per_model_step", "gemv_grid", "gemm_fp32_curve", "gemm_dram_slowdown", "conv_weight_gbps"):
        profile[k] = r[k]
    profile["calibrated"] = True
    profile["calibration"] = {"path": str(cache_path(threads)), "date": data["date"], "threads": threads,
                              "host_busy": data.get("host_busy", False), "method": data["method"]}
    return profile


# --- measurements ----------------------------------------------------------------------------

def _median_s(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_tflops(dtype, shape, repeats: int) -> float | None:
    import torch

    m, k, n = shape
    if dtype == torch.int8:
        if not hasattr(torch, "_int_mm"):
            return None
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    try:
        s = _median_s(fn, repeats)
    except RuntimeError:  # dtype not implemented on this build
        return None
    return 2.0 * m * k * n / s / 1e12  # one multiply + one add per MAC


def _bandwidth_gbps(mb: int, n_in: int, repeats: int) -> tuple[float, float]:
    """(GEMV read GB/s, reduction read GB/s) over an fp32 matrix of ``mb`` MiB."""
    import torch

    n_out = max(1, mb * 2**20 // 4 // n_in)
    w = torch.empty(n_out, n_in).uniform_(-1, 1)  # written, so every page is really backed
    x = torch.randn(1, n_in)
    gemv = _median_s(lambda: x @ w.T, repeats)
    total = _median_s(lambda: w.sum(), repeats)
    return w.nbytes / gemv / 1e9, w.nbytes / total / 1e9


def _gemv_grid(sizes: Sizes) -> dict:
    """Achieved read bandwidth (GB/s) of an fp32 ``x[1, in] @ W.T`` by row length ``in`` and matrix
    size, cycling through enough distinct matrices (``gemv_pool_mb`` in all) that every call reads
    its weights from DRAM, as a decode step does. On CPUs short rows stream markedly slower (each
    row is a separate dot product), and small matrices pay the fixed cost of the call and of its
    split over threads: a decode step's matmuls run at the bandwidth of their own shape."""
    import torch

    grid = []
    for n_in in sizes.gemv_grid_in:
        x, row = torch.randn(1, n_in), []
        for mb in sizes.gemv_grid_mb:
            n_out = max(1, int(mb * 2**20) // 4 // n_in)
            count = max(1, int(sizes.gemv_pool_mb / mb))
            pool = [torch.empty(n_out, n_in).uniform_(-1, 1) for _ in range(count)]

            def cycle():
                for w in pool:
                    torch.nn.functional.linear(x, w)

            row.append(pool[0].nbytes / (_median_s(cycle, max(3, sizes.repeats // 2)) / count) / 1e9)
            del pool
        grid.append(row)
    return {"in_features": list(sizes.gemv_grid_in), "mib": list(sizes.gemv_grid_mb), "gbps": grid}


def _gemm_curve(sizes: Sizes) -> list[list[float]]:
    """``[[rows M, FLOP/s], ...]``: fp32 ``[M, K] @ [K, N]`` (K = N = ``gemm_curve_kn``) per M;
    a prefill's matmuls run at the rate of their token count, well below the peak at small M."""
    import torch

    kn, out = sizes.gemm_curve_kn, []
    w = torch.randn(kn, kn)
    for m in sizes.gemm_curve_rows:
        a = torch.randn(m, kn)
        reps = max(3, min(50, int(2e9 / (2.0 * m * kn * kn))))  # ~2 GFLOP per timed batch

        def batch():
            for _ in range(reps):
                torch.nn.functional.linear(a, w)

        out.append([float(m), 2.0 * m * kn * kn * reps / _median_s(batch, max(3, sizes.repeats // 2))])
    return out


def _gemm_dram_slowdown(sizes: Sizes) -> list[list[float]]:
    """``[[rows, factor], ...]`` from ``[1, 1.0]``: time of fp32 ``x[rows, in] @ W.T`` over the
    one-row time, both cycling distinct matrices (``gemv_pool_mb`` in all) so weights come from
    DRAM as in a decode step; the median over ``dram_shapes``. A batched decode step's matmuls
    are priced as the GEMV of their shape times this factor (their FLOPs are far below the peak)."""
    import torch

    per_shape = []
    for n_in, n_out in sizes.dram_shapes:
        count = max(2, int(sizes.gemv_pool_mb * 2**20 // (4 * n_in * n_out)))
        pool = [torch.empty(n_out, n_in).uniform_(-1, 1) for _ in range(count)]
        times = {}
        for rows in (1, *sizes.dram_rows):
            x = torch.randn(rows, n_in)

            def cycle():
                for w in pool:
                    torch.nn.functional.linear(x, w)

            times[rows] = _median_s(cycle, max(3, sizes.repeats // 2))
        per_shape.append({r: t / times[1] for r, t in times.items()})
        del pool
    return [[1.0, 1.0]] + [[float(r), statistics.median(f[r] for f in per_shape)] for r in sizes.dram_rows]


def _conv_weight_gbps(sizes: Sizes) -> float:
    """Weight bytes / median time of an fp32 ``conv2d`` 3x3, ``conv_channels`` in and out, on a
    ``[2, C, 1, 1]`` input: each weight is used twice (one output position per sample, only the
    kernel's centre tap meets the map), so the call's time is its handling of the weights."""
    import torch

    c = sizes.conv_channels
    x, w = torch.randn(2, c, 1, 1), torch.randn(c, c, 3, 3)
    return w.nbytes / _median_s(lambda: torch.nn.functional.conv2d(x, w, padding=1), sizes.repeats) / 1e9


def _op_overhead_us(calls: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(1, 64), torch.randn(64, 64)

    def batch():
        for _ in range(calls):
            F.linear(x, w)

    return _median_s(batch, repeats) / calls * 1e6


def _tiny_llama(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      num_hidden_layers=layers, vocab_size=256, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def _decode_step_us(models: dict, sizes: Sizes) -> dict:
    """Median decode-step time (µs) per model, rounds interleaved so drift hits all alike.

    Each round prefills ``decode_prompt`` tokens into a fresh DynamicCache, then times
    ``decode_steps`` single-token steps (the cache grows by that many tokens).
    """
    import torch

    times: dict = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(sizes.decode_rounds):
            for k, model in models.items():
                ids = torch.randint(0, 256, (1, sizes.decode_prompt))
                out = model(input_ids=ids, use_cache=True)
                cache, tok = out.past_key_values, ids[:, -1:]
                for _ in range(sizes.decode_steps + 1):  # the first step is a warm-up
                    t0 = time.perf_counter()
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                    times[k].append(time.perf_counter() - t0)
                    cache = out.past_key_values
                times[k].pop(-sizes.decode_steps - 1)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _measure(threads: int, sizes: Sizes) -> dict:
    """Run every benchmark once; returns ``results`` and ``method`` dicts."""
    import torch

    peaks = {"fp32": _gemm_tflops(torch.float32, sizes.gemm_fp32, sizes.repeats),
             "bf16": _gemm_tflops(torch.bfloat16, sizes.gemm_bf16, max(3, sizes.repeats // 2)),
             "int8": _gemm_tflops(torch.int8, sizes.gemm_int8, max(3, sizes.repeats // 2))}
    peaks = {k: v for k, v in peaks.items() if v}
    gemv, stream = _bandwidth_gbps(sizes.gemv_mb, sizes.gemv_in, sizes.repeats + 2)
    op_us = _op_overhead_us(sizes.op_calls, sizes.repeats)
    step = _decode_step_us({1: _tiny_llama(1), 3: _tiny_llama(3)}, sizes)
    # Difference of two model depths separates per-layer from per-model cost; floors keep noise
    # from producing a non-positive value on a busy host.
    # The tiny layers' 7 linears are priced by the GEMV curve in a prediction: not overhead.
    per_layer = max((step[3] - step[1]) / 2 - 7 * op_us, op_us)
    per_model = max(step[1] - per_layer, op_us)
    (mf, kf, nf), (mb, kb, nb), (mi, ki, ni) = sizes.gemm_fp32, sizes.gemm_bf16, sizes.gemm_int8
    results = {
        "peak_tflops": peaks,
        "memory_bandwidth_gbps": gemv,
        "stream_read_gbps": stream,
        "overhead_us_per_op": op_us,
        "overhead_us_per_layer": per_layer,
        "overhead_us_per_model_step": per_model,
        "decode_step_us_1_layer": step[1],
        "decode_step_us_3_layers": step[3],
        "gemv_grid": _gemv_grid(sizes),
        "gemm_fp32_curve": _gemm_curve(sizes),
        "gemm_dram_slowdown": _gemm_dram_slowdown(sizes),
        "conv_weight_gbps": _conv_weight_gbps(sizes),
    }
    method = {
        "peak_tflops.fp32": f"torch.mm [{mf}x{kf}]@[{kf}x{nf}] fp32, 2*M*K*N / median of {sizes.repeats}",
        "peak_tflops.bf16": f"torch.mm [{mb}x{kb}]@[{kb}x{nb}] bf16, 2*M*K*N / median",
        "peak_tflops.int8": f"torch._int_mm [{mi}x{ki}]@[{ki}x{ni}] int8->int32, 2*M*K*N / median",
        "memory_bandwidth_gbps": f"fp32 GEMV x[1,{sizes.gemv_in}] @ W.T over a {sizes.gemv_mb} MiB matrix, W bytes / median time",
        "stream_read_gbps": f"W.sum() over the same {sizes.gemv_mb} MiB fp32 matrix, bytes / median time",
        "overhead_us_per_op": f"F.linear [1x64]@[64x64].T, median of {sizes.repeats} batches of {sizes.op_calls} calls",
        "overhead_us_per_layer": ("(t3 - t1) / 2 - 7 x overhead_us_per_op (its linears), t_L = median decode-step time of a random LlamaForCausalLM with L layers "
                                  f"(hidden 64, 4 heads, 2 kv heads, intermediate 128, vocab 256), DynamicCache of "
                                  f"{sizes.decode_prompt}-{sizes.decode_prompt + sizes.decode_steps} tokens, torch.no_grad, "
                                  f"{sizes.decode_rounds} interleaved rounds x {sizes.decode_steps} steps"),
        "overhead_us_per_model_step": "t1 - overhead_us_per_layer (embedding, final norm, LM head, HF forward glue)",
        "gemv_grid": (f"GB/s of fp32 F.linear x[1,in] @ W.T for in in {list(sizes.gemv_grid_in)} x W of "
                      f"{list(sizes.gemv_grid_mb)} MiB, cycling distinct matrices ({sizes.gemv_pool_mb} MiB in all) so "
                      "weights come from DRAM; bytes / median time per call"),
        "gemm_fp32_curve": (f"[M, FLOP/s]: fp32 F.linear [M x {sizes.gemm_curve_kn}] @ [{sizes.gemm_curve_kn} x "
                            f"{sizes.gemm_curve_kn}] for M in {list(sizes.gemm_curve_rows)}, 2*M*K*N / median"),
        "gemm_dram_slowdown": (f"[rows, factor]: time of fp32 F.linear x[rows, in] @ W.T over that of x[1, in], for rows in "
                               f"{list(sizes.dram_rows)}, cycling distinct W ({sizes.gemv_pool_mb} MiB in all) so weights come "
                               f"from DRAM; median over (in, out) in {[list(x) for x in sizes.dram_shapes]}"),
        "conv_weight_gbps": (f"weight bytes / median time of fp32 conv2d 3x3, {sizes.conv_channels} -> {sizes.conv_channels} "
                             "channels, padding 1, on a [2, C, 1, 1] input (negligible arithmetic)"),
    }
    curves = [v for _, v in results["gemm_fp32_curve"]] + [v for row in results["gemv_grid"]["gbps"] for v in row] + \
        [v for _, v in results["gemm_dram_slowdown"]]
    for k, v in list(peaks.items()) + [(k, results[k]) for k in results if not isinstance(results[k], (dict, list))] + \
            [("curve point", v) for v in curves]:
        if not (math.isfinite(v) and v > 0):
            raise RuntimeError(f"calibration produced a non-positive {k}: {v}")
    return {"results": results, "method": method}


def calibrate_local(threads: int = 2, force: bool = False, sizes: Sizes = Sizes()) -> dict:
    """Measure this machine (or reuse the cached measurement); returns the cache record.

    The record has ``results`` (units in the key names), ``method`` (how each was measured),
    ``key`` (torch, CPU model, threads, sizes), ``date``, ``seconds``, load averages and
    ``cached`` (True when nothing was measured this call).
    """
    if not force:
        data = read_cache(threads, sizes)
        if data is not None:
            return {**data, "cached": True}
    import torch

    old = torch.get_num_threads()
    load_before = _loadavg()
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(threads)
        measured = _measure(threads, sizes)
    finally:
        torch.set_num_threads(old)
    data = {"schema": SCHEMA, "key": _key(threads, sizes),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 2), "load_average_before": load_before,
            "load_average_after": _loadavg(), "host_busy": _busy(load_before, threads), **measured}
    p = cache_path(threads)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, p)
    return {**data, "cached": False}


def _busy(load: list[float] | None, threads: int) -> bool:
    """True when other work already occupied the cores we need: OpenMP threads then wait on each
    other and small-op timings (the overheads) come out up to ~10-100x too slow."""
    return bool(load) and load[0] + threads > (os.cpu_count() or 1) + 1.0  # the 1-min average lags: allow one


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def calibrate_cli(threads: int = 2, force: bool = False) -> str:
    """Run (or reuse) the calibration and return a printable summary."""
    data = calibrate_local(threads=threads, force=force)
    r = data["results"]
    peaks = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in r["peak_tflops"].items())
    how = f"cached from {data['date']}" if data["cached"] else f"measured in {data['seconds']:.0f} s"
    return "\n".join([
        f"local calibration, {threads} threads, {data['key']['cpu_model']}, torch {data['key']['torch']} ({how})",
        f"  peak GFLOP/s (int8: GOP/s): {peaks}",
        f"  fp32 GEMV read bandwidth {r['memory_bandwidth_gbps']:.1f} GB/s (stream read {r['stream_read_gbps']:.1f} GB/s)",
        f"  overhead: {r['overhead_us_per_op']:.1f} us/op, {r['overhead_us_per_layer']:.0f} us/decoder layer, "
        f"{r['overhead_us_per_model_step']:.0f} us/model step",
        f"  eager fp32 convolution: {r['conv_weight_gbps']:.2f} GB/s of weights per call",
        "  GEMV from DRAM, GB/s by row length (at " + "/".join(f"{m:g}" for m in r["gemv_grid"]["mib"]) + " MiB): "
        + "; ".join(f"in {n}: " + "/".join(f"{v:.1f}" for v in row) for n, row in zip(r["gemv_grid"]["in_features"], r["gemv_grid"]["gbps"])),
        "  fp32 GEMM by rows (M: GFLOP/s): " + ", ".join(f"{m:g}: {f / 1e9:.0f}" for m, f in r["gemm_fp32_curve"]),
        "  batched matmul from DRAM, time over the one-row GEMV (rows: x): "
        + ", ".join(f"{m:g}: {f:.2f}" for m, f in r["gemm_dram_slowdown"]),
        f"  cache: {cache_path(threads)}  (re-run with force to measure again)",
    ] + ([f"  warning: the host was busy (load average {data['load_average_before'][0]:.1f} on {os.cpu_count()} cores); "
          "timings, small-op overheads above all, may be far too slow: re-run with force when it is idle"]
         if data.get("host_busy") else []))
