"""Serving under load on smollm2-135m (issue 18): rate sweeps against real servers, capacity per setup.

    python benchmarks/serving.py [--setups torch-cb,torch-serial,llamacpp-f32,llamacpp-q4_0]
        [--rates 0.25,0.5,1,2] [--num-requests 16] [--duration 60] [--slo ttft:2s,tpot:250ms]
        [--prompt-len 128] [--max-tokens 32] [--threads 2] [--out runs/serving]

Each setup is one server that ``leanfm serve`` would start (the same code: ``leanfm.serving.serve``):

- ``torch-cb``: transformers' ``serve`` with continuous batching (paged KV cache), fp32 baseline;
- ``torch-serial``: the same server without continuous batching (each request generated on its own);
- ``llamacpp-<type>``: llama-cpp-python's server (one request at a time, the others queued) on a GGUF export of the
  baseline (``f32``) or of ``rtn-q4_0`` (``q4_0``: llama.cpp's own Q4_0 grid); ``llamacpp-q4_0-kv8``:
  the same with the K/V cache in q8_0 (flash attention on).

For each setup: prepare the model, start the server, one warm-up request, then ``leanfm
loadtest``'s client at each rate in increasing order (Poisson arrivals, streaming, prompts from
WikiText-2 test cut with the model's tokenizer). A rate is *sustained* when at least
``--attainment`` (default 0.9) of its requests met every SLO bound; the capacity of a setup is the
highest sustained rate of the sweep. A sweep stops after two rates in a row that were not
sustained (higher rates only queue more). Prints one table per setup and the capacity summary
beside the predictor's throughput-vs-batch curve for the setup's recipe (``predicted_curve``);
writes ``<out>/serving.json``, and ``<out>/results.json`` (``kind: loadtest``, one run per setup
and rate) with its ``report.html`` (latency-vs-rate plots), both updated after every rate.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

MODEL = "smollm2-135m"
SETUPS = {
    "torch-cb": dict(runtime="torch", recipe=None, cb=True),
    "torch-serial": dict(runtime="torch", recipe=None, cb=False),
    "llamacpp-f32": dict(runtime="llama.cpp", recipe=None, gguf="f32"),
    "llamacpp-q4_0": dict(runtime="llama.cpp", recipe="rtn-q4_0", gguf="q4_0"),
    "llamacpp-q4_0-kv8": dict(runtime="llama.cpp", recipe="rtn-q4_0", gguf="q4_0", kv="q8_0"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    ap.add_argument("--rates", default="0.25,0.5,1,2")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--drain", type=float, default=120.0)
    ap.add_argument("--slo", default="ttft:2s,tpot:250ms")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", default="runs/serving")
    a = ap.parse_args()

    import leanfm
    from leanfm.data.calib import Calibration
    from leanfm.data.text import load_text
    from leanfm.measure.loadtest import LoadSpec, make_requests, parse_slo, run_load
    from leanfm.serving.serve import prepare, running

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = parse_slo(a.slo)
    rates = [float(r) for r in a.rates.split(",")]
    _, tok = leanfm.load(MODEL)
    reqs = make_requests(load_text("wikitext2", "test"), a.num_requests, a.prompt_len, a.max_tokens, 0.0, 0, tok)
    calib = Calibration(n=32, seqlen=512)
    report = {"args": vars(a), "setups": {}}
    from leanfm.measure.environment import environment
    from leanfm.report.serving import capacity, write_loadtest_report
    from leanfm.results import new_results, write

    results = new_results(environment(a.threads), {"kind": "loadtest", "url": "per setup", "rates": rates, "slo_ms": slo,
                                                   "dataset": "wikitext2", "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
                                                   "range_ratio": 0.0, "prompt_unit": "tokens", "model": MODEL})
    results["kind"] = "loadtest"
    for name in a.setups.split(","):
        st = SETUPS[name]
        work = out / name
        t0 = time.perf_counter()
        path = prepare(MODEL, st["recipe"], st["runtime"], work, st.get("gguf", "auto"), calib)
        prep_s = time.perf_counter() - t0
        rows = []
        with running(st["runtime"], path, "127.0.0.1", a.port, a.threads, work, st.get("cb", True),
                     kv_type=st.get("kv", "f16")) as (base, proc):
            print(f"\n{name}: {st['runtime']} at {base} (prepared in {prep_s:.0f} s)", flush=True)
            run_load(base, reqs[:1], LoadSpec(rate=1.0, num_requests=1, drain=a.drain))  # warm-up
            misses = 0
            for r in rates:
                spec = LoadSpec(rate=r, num_requests=a.num_requests, duration=a.duration, drain=a.drain, seed=0)
                load0 = os.getloadavg()[0]
                res = run_load(base, reqs, spec, slo)
                m = res["metrics"]
                ok = m["slo_attainment"] >= a.attainment
                rows.append({"rate": r, "sustained": ok, "load_before": load0, **m, "errors": res["details"]["errors"]})
                results["runs"].append({"recipe": {"name": name}, "status": "ok", "rate": r, "metrics": {"arrival_rate": r, **m},
                                        "details": {**res["details"], "setup": st, "load_before": load0}, "flags": {}})
                write(results, out)
                write_loadtest_report(results, out, a.attainment)
                f = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
                print(f"  rate {r:g}: {m['completed']}/{m['requests']} ok, TTFT p50 {f(m['ttft_ms_p50'])} p99 {f(m['ttft_ms_p99'])} ms, "
                      f"TPOT p50 {f(m['tpot_ms_p50'])} p99 {f(m['tpot_ms_p99'])} ms, {m['request_throughput']:.2f} req/s, "
                      f"{m['output_token_throughput']:.1f} tok/s, {m['mean_output_tokens'] or 0:.1f} tokens/request, goodput {m['goodput']:.2f} req/s, attainment "
                      f"{m['slo_attainment']:.2f}{'' if ok else ' (not sustained)'}", flush=True)
                misses = 0 if ok else misses + 1
                if misses >= 2:
                    break
        cap = capacity([x for x in results["runs"] if x["recipe"]["name"] == name], a.attainment)
        report["setups"][name] = {"setup": st, "prepare_s": prep_s, "rows": rows, "capacity": cap,
                                  "predicted": predicted_curve(st, a, slo)}
        (out / "serving.json").write_text(json.dumps(report, indent=1))

    print(f"\nsmollm2-135m, {a.threads} threads per server, {a.num_requests} requests per rate (prompt {a.prompt_len} tokens "
          f"of WikiText-2 test, {a.max_tokens} output tokens), Poisson arrivals, SLO {a.slo}, sustained = attainment >= {a.attainment}")
    print("| setup | rate req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | req/s | output tok/s | tokens/request | goodput req/s | attainment |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["setups"].items():
        for row in s["rows"]:
            f = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
            print(f"| {name} | {row['rate']:g} | {f(row['ttft_ms_p50'])} / {f(row['ttft_ms_p99'])} | {f(row['tpot_ms_p50'])} / "
                  f"{f(row['tpot_ms_p99'])} | {row['request_throughput']:.2f} | {row['output_token_throughput']:.1f} | "
                  f"{row['mean_output_tokens'] or 0:.1f} | {row['goodput']:.2f} | {row['slo_attainment']:.2f} |")
    print("\ncapacity (highest sustained rate of the sweep) beside the predictor's curve (leanfm predict on the local profile: "
          "decode step at batch b; busy-server rate = 1 / (prefill of one prompt + max_tokens x step(b) / b)):")
    print("| setup | measured capacity req/s | " + " | ".join(f"b={b}: TPOT ms / tok/s / rate" for b in BATCHES) + " | predicted capacity req/s |")
    print("|---|---|" + "---|" * len(BATCHES) + "---|")
    for name, s in report["setups"].items():
        p = s["predicted"]
        cells = ["–" if c["busy_rate"] != c["busy_rate"] else  # nan: a one-at-a-time server has batch 1 only
                 f"{c['tpot_ms']:.0f} / {c['decode_tokens_per_s']:.0f} / {c['busy_rate']:.2f}{'' if c['meets_tpot'] else ' (TPOT over SLO)'}"
                 for c in p["curve"]]
        print(f"| {name} | {s['capacity']:g} | " + " | ".join(cells) + f" | {p['capacity']:.2f} |")
    print(f"\nresults: {out / 'results.json'}\nreport:  {out / 'report.html'}")


BATCHES = (1, 2, 4, 8, 16)


def predicted_curve(st: dict, a, slo: dict) -> dict:
    """The predictor's throughput-vs-batch curve for a setup's recipe on the local profile. A
    one-at-a-time server (``cb`` false, llama.cpp) only has batch 1; a continuously batching one
    may run up to 16 sequences per step. Its predicted capacity is the highest busy-server rate over
    the batches whose step time meets the SLO's TPOT bound (TTFT's queueing is not modelled)."""
    from leanfm.predict.analyzer import predict

    recipe = st["recipe"] or "baseline"
    one = predict(MODEL, recipe, "local", batch=1, prompt=a.prompt_len, gen=a.max_tokens)
    curve = []
    for b in (BATCHES if st.get("cb", False) else (1,)):
        p = one if b == 1 else predict(MODEL, recipe, "local", batch=b, prompt=a.prompt_len, gen=a.max_tokens)
        busy = 1.0 / ((one["prefill_ms"] + a.max_tokens * p["tpot_ms"] / b) / 1000.0)
        curve.append({"batch": b, "tpot_ms": p["tpot_ms"], "decode_tokens_per_s": p["decode_tokens_per_s"], "busy_rate": busy,
                      "meets_tpot": "tpot" not in slo or p["tpot_ms"] <= slo["tpot"]})
    while len(curve) < len(BATCHES):
        curve.append({"batch": BATCHES[len(curve)], "tpot_ms": float("nan"), "decode_tokens_per_s": float("nan"),
                      "busy_rate": float("nan"), "meets_tpot": False})
    ok = [c["busy_rate"] for c in curve if c["meets_tpot"]]
    return {"recipe": recipe, "hardware": "local", "curve": curve, "capacity": max(ok) if ok else 0.0}


if __name__ == "__main__":
    main()
