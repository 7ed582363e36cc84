"""Compiled decode vs eager on smollm2-135m (issue 18), measured side by side in one run.

    python benchmarks/compiled_decode.py [--recipes baseline,int4-fast,layerdrop25,self-spec,early-exit]
        [--threads 2] [--repeats 10] [--prompt 128] [--gen 32] [--int4-dir DIR] [--out runs/compiled-decode]
        [--batches 1,4,16] [--batches-only]

Each recipe's model gets two timers — eager (dynamic KV cache) and compiled (static KV cache,
torch.compile'd step, one-row fp32 matmuls on leanfm's C++ GEMV) — from
``leanfm.measure.speed.DecodeTimer``, the code ``leanfm bench [--compile]`` runs; the baseline
gets a third, compiled with aten's ``mm`` kept (``compiled-aten-mm``), to split the compiler's
gain from the kernel's. All compiles happen first; then one warm-up round and ``--repeats`` recorded
rounds, each running one repeat of every timer in turn (A B C ... A B C), so a noisy machine
hits all of them alike. Printed per timer: decode tok/s median (min-max over repeats), the path
that ran (or why it fell back to eager), compile seconds, achieved GB/s and the roofline
fraction against the ``local`` profile's nominal bandwidth and against this machine's measured
GEMV bandwidth (``leanfm predict --calibrate``'s cache, when present); then the ratios the issue
asks for. ``int4-fast`` needs GPTQ (about 15 minutes on 2 cores): the output is compressed once
into ``<out>/int4-fast`` (or read from ``--int4-dir``) and loaded from there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _int4_model(a, out: Path):
    import leanfm

    d = Path(a.int4_dir) if a.int4_dir else out / "int4-fast"
    if not (d / "recipe.yaml").exists() and not any(d.glob("*.safetensors")):
        cmd = [str(Path(sys.executable).with_name("leanfm")), "compress", "--model", MODEL, "--recipe", "int4-fast",
               "--out", str(d), "--threads", str(a.threads), "--overwrite"]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return leanfm.load(str(d))[0]


def _model(a, name: str, out: Path, calib):
    import leanfm

    if name == "int4-fast":
        return _int4_model(a, out)
    model = leanfm.load(MODEL)[0]
    return model if name == "baseline" else leanfm.apply_(model, name, calib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="baseline,int4-fast,layerdrop25,self-spec,early-exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--int4-dir", default=None, help="a saved int4-fast output (leanfm compress --recipe int4-fast)")
    ap.add_argument("--batches", default="1,4,16", help="also: the fp32 baseline's eager decode at these batch sizes vs the "
                    "predictor's decode tok/s on local (empty: skip)")
    ap.add_argument("--batches-only", action="store_true", help="only the eager batch sizes vs the predictor (no compiled timers)")
    ap.add_argument("--out", default="runs/compiled-decode")
    a = ap.parse_args()

    import torch

    import leanfm
    from leanfm.data.calib import encode
    from leanfm.data.text import load_text
    from leanfm.measure import memory as mem
    from leanfm.measure.cost import load_profile
    from leanfm.measure.flops import flops_per_token
    from leanfm.measure.bandwidth import roofline_metrics
    from leanfm.measure.speed import DecodeTimer

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tok = leanfm.load(MODEL)
    ids = encode(tok, load_text("wikitext2", "test"))
    prompt = ids[: a.prompt].view(1, a.prompt)
    calib = leanfm.calibration("gensim-wiki", n=32, seqlen=512)
    profile = load_profile()
    calibrated = None
    cache = Path(os.environ.get("LEANFM_CACHE", Path.home() / ".cache" / "leanfm")) / "hardware" / f"local-t{a.threads}.json"
    if cache.exists():
        calibrated = json.loads(cache.read_text())["results"]["memory_bandwidth_gbps"]

    if a.batches_only:
        batch_rows = _batches(a, leanfm.load(MODEL)[0], ids)
        (out / "predictor_batches.json").write_text(json.dumps({"args": vars(a), "batches": batch_rows}, indent=1, default=str))
        return
    names = a.recipes.split(",")
    timers: dict[tuple[str, str], DecodeTimer] = {}
    models = {}
    for name in names:
        t0 = time.perf_counter()
        models[name] = model = _model(a, name, out, calib)
        print(f"{name}: model ready in {time.perf_counter() - t0:.0f} s", flush=True)
        paths = ("eager", "compiled", "compiled-aten-mm") if name == "baseline" else ("eager", "compiled")
        for path in paths:
            # compiled-aten-mm: the same compiled step with aten's mm instead of leanfm's GEMV, on its
            # own copy of the model (another torch.compile of the same forward), to split the gain
            m = leanfm.load(MODEL)[0] if path == "compiled-aten-mm" else model
            timers[(name, path)] = DecodeTimer(m, prompt, a.gen, compile=path != "eager", own_gemv=path == "compiled")
            if path != "eager":
                t = timers[(name, path)]
                print(f"  compiled: {t.path}; compile {t.compile_seconds():.0f} s" if t.decoders else f"  compiled: fell back: {t.fallback}",
                      flush=True)
    load0 = os.getloadavg()
    for r in range(1 + a.repeats):
        for t in timers.values():
            t.repeat(record=r >= 1)
        print(f"round {r + 1}/{1 + a.repeats}", flush=True)
    load1 = os.getloadavg()

    rows = {}
    for (name, path), t in timers.items():
        res = t.result()
        m, d = res["metrics"], res["details"]
        model = models[name]
        context = a.prompt + (a.gen + 1) / 2
        fl = flops_per_token(model, context)
        kv = mem.tensor_bytes(res["cache"]) * context / (a.prompt + a.gen)
        roof = roofline_metrics(model, m["decode_tokens_per_s"], 1, fl, kv, profile)
        row = {"tok_s": m["decode_tokens_per_s"], "min": d["decode_tokens_per_s_min"], "max": d["decode_tokens_per_s_max"],
               "repeats": d["decode_tokens_per_s_repeats"], "path": d["decode_path"], "fallback": d.get("compile_fallback"),
               "compile_s": m.get("compile_seconds"), "achieved_gbps": roof.get("achieved_gbps"),
               "roofline_fraction": roof.get("roofline_fraction"), "bytes_per_step": roof.get("decode_bytes_per_step"),
               "other_busy_cores": d["cpu_other_busy_cores_repeats"]}
        if calibrated and roof.get("achieved_gbps"):
            row["fraction_of_measured_bw"] = roof["achieved_gbps"] / calibrated
        for k in ("acceptance_rate", "mean_accepted_tokens", "mean_layers_used", "early_exit_rate"):
            if k in m:
                row[k] = m[k]
        rows[f"{name}/{path}"] = row

    print(f"\nsmollm2-135m, batch 1, prompt {a.prompt}, {a.gen} greedy decode steps, {a.threads} threads, torch {torch.__version__}; "
          f"1 warm-up + {a.repeats} recorded rounds interleaved over {len(timers)} timers; load average before/after "
          f"{[round(x, 2) for x in load0]} / {[round(x, 2) for x in load1]}; roofline: local profile "
          f"{profile['memory_bandwidth_gbps']} GB/s nominal" + (f", {calibrated:.1f} GB/s measured (fp32 GEMV)" if calibrated else ""))
    print("| recipe | path | decode tok/s (min-max) | compile s | GB/s | roofline fraction (nominal) | of measured bw | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        notes = r["fallback"] and f"fell back: {r['fallback']}" or r["path"]
        extra = ", ".join(f"{k} {r[k]:.3f}" for k in ("acceptance_rate", "mean_layers_used") if k in r)
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        print(f"| {key.split('/')[0]} | {key.split('/')[1]} | {r['tok_s']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | {fmt(r['compile_s'], '.0f')} | "
              f"{fmt(r['achieved_gbps'], '.2f')} | {fmt(r['roofline_fraction'], '.3f')} | {fmt(r.get('fraction_of_measured_bw'), '.3f')} | "
              f"{notes}{'; ' + extra if extra else ''} |")

    def ratio(x, y):
        if x in rows and y in rows:
            rx, ry = rows[x], rows[y]
            return f"{rx['tok_s'] / ry['tok_s']:.2f}x (worst/best {rx['min'] / ry['max']:.2f}x)"
        return "not measured"

    print("\nratios (medians; in brackets the slowest repeat of the first over the fastest of the second):")
    print(f"- fp32 compiled / fp32 eager: {ratio('baseline/compiled', 'baseline/eager')} (target >= 1.5x)")
    print(f"- fp32 compiled with aten's mm / fp32 eager: {ratio('baseline/compiled-aten-mm', 'baseline/eager')}; "
          f"leanfm's GEMV / aten's mm, both compiled: {ratio('baseline/compiled', 'baseline/compiled-aten-mm')}")
    if "baseline/compiled" in rows:
        print(f"- fp32 compiled roofline fraction (nominal {profile['memory_bandwidth_gbps']} GB/s): "
              f"{rows['baseline/compiled']['roofline_fraction']:.3f} (target >= 0.60)")
    print(f"- int4-fast compiled / fp32 eager: {ratio('int4-fast/compiled', 'baseline/eager')} (target >= 3x)")
    print(f"- int4-fast compiled / int4-fast eager: {ratio('int4-fast/compiled', 'int4-fast/eager')}")
    print(f"- layerdrop25 compiled / fp32 compiled: {ratio('layerdrop25/compiled', 'baseline/compiled')} (target >= 1.25x)")
    print(f"- layerdrop25 eager / fp32 eager: {ratio('layerdrop25/eager', 'baseline/eager')}")
    for n in ("self-spec", "early-exit"):
        print(f"- {n} compiled / fp32 compiled: {ratio(n + '/compiled', 'baseline/compiled')}; "
              f"{n} eager / fp32 eager: {ratio(n + '/eager', 'baseline/eager')}")
    batch_rows = _batches(a, models.get("baseline"), ids) if a.batches and "baseline" in models else {}
    (out / "compiled_decode.json").write_text(json.dumps({"args": vars(a), "rows": rows, "load": [load0, load1],
                                                          "batches": batch_rows}, indent=1))


def _batches(a, model, ids) -> dict:
    """Eager decode tok/s of the fp32 baseline at each batch size (interleaved repeats) beside the
    roofline predictor's for the same batch, prompt and gen on ``local`` (calibrated when cached)."""
    from leanfm.measure.speed import DecodeTimer
    from leanfm.predict.versus import prediction_for_run

    batches = [int(b) for b in a.batches.split(",")]
    timers = {b: DecodeTimer(model, ids[: b * a.prompt].view(b, a.prompt), a.gen) for b in batches}
    for r in range(1 + a.repeats):
        for t in timers.values():
            t.repeat(record=r >= 1)
    rows = {}
    print(f"\nfp32 baseline, eager decode by batch size (prompt {a.prompt}, {a.gen} steps, {a.threads} threads, 1 warm-up + "
          f"{a.repeats} interleaved rounds) vs `leanfm predict` on local:")
    print("| batch | measured decode tok/s (min-max) | predicted tok/s | prediction error | calibrated |")
    print("|---|---|---|---|---|")
    for b, t in timers.items():
        res = t.result()
        m, d = res["metrics"], res["details"]
        pred = prediction_for_run(MODEL, "baseline", b, a.prompt, a.gen, a.threads)
        p = pred.get("decode_tokens_per_s")
        err = None if not p else (p / m["decode_tokens_per_s"] - 1) * 100
        rows[b] = {"measured": m["decode_tokens_per_s"], "min": d["decode_tokens_per_s_min"], "max": d["decode_tokens_per_s_max"],
                   "predicted": p, "error_pct": err, "calibrated": pred.get("calibrated"), "prediction": pred}
        print(f"| {b} | {m['decode_tokens_per_s']:.1f} ({d['decode_tokens_per_s_min']:.1f}-{d['decode_tokens_per_s_max']:.1f}) | "
              f"{'–' if p is None else f'{p:.1f}'} | {'–' if err is None else f'{err:+.1f}%'} | {pred.get('calibrated')} |")
    return rows


if __name__ == "__main__":
    main()
