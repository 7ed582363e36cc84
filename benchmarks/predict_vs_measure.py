"""Predicted vs measured on this machine (issue 6): ``prefill_ms`` and ``decode_tokens_per_s``.

    python benchmarks/predict_vs_measure.py --calibrate            # once, on an idle machine
    python benchmarks/predict_vs_measure.py [--models smollm2-135m,gemma3-270m,qwen2.5-0.5b]
                                            [--recipes baseline,rtn-w8,rtn-w4g64] [--write docs/benchmarks.md]

Per model (skipped with a note when not installed): ``leanfm bench`` with the speed group only
(batch 1, prompt 128, gen 32, 1 warm-up + ``--repeats`` repeats, ``--threads`` threads), which
records next to every measured run the roofline prediction made from the model's config and the
recipe alone on the ``local`` profile (``predicted_*`` metrics, docs/results-schema.md). The
table re-makes each prediction with the current calibration (it needs no measurement) and lists
it beside the measured value, with the error ``predicted / measured - 1``. The prediction uses the cached
calibration of this machine (``--calibrate`` runs the micro-benchmarks; the table says whether
the profile was calibrated and with which figures). Models are measured one after the other, so
each model's runs share one process and one machine state.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdsection import write_section  # noqa: E402


def _measure(a) -> None:
    import torch

    from leanfm.bench import bench
    from leanfm.errors import LeanfmError
    from leanfm.measure.protocol import Protocol
    from leanfm.models.registry import ALIASES

    torch.set_num_threads(a.threads)
    proto = Protocol(groups=("speed",), batch=1, prompt=128, gen=32, repeats=a.repeats, warmup=1, threads=a.threads)
    for model in a.models.split(","):
        out = Path(a.out_dir) / model
        spec = ALIASES.get(model)
        if spec is not None and not spec.installed():
            print(f"{model}: not installed ({spec.install}); skipped", flush=True)
            continue
        try:
            bench(model, a.recipes.split(","), proto, out)
        except LeanfmError as e:
            print(f"{model}: {e}", flush=True)


def _table(a) -> str:
    from leanfm.predict.hardware import load_hardware
    from leanfm.predict.versus import compare, prediction_for_run

    rows, notes = [], []
    for f in sorted(Path(a.out_dir).glob("*/results.json")):
        d = json.loads(f.read_text())
        for run in d["runs"]:
            if run.get("status") != "ok" or "decode_tokens_per_s" not in (run.get("metrics") or {}):
                continue
            # predictions are made from the config and recipe alone, so they are (re)made here with the
            # current calibration; the measured numbers are the run's
            proto = d["protocol"]
            p = prediction_for_run(d["model"], run["recipe"]["steps"], proto["batch"], proto["prompt"], proto["gen"],
                                   proto["threads"])
            m = {**run["metrics"], **compare(p, run["metrics"])}
            if "predicted_decode_tokens_per_s" not in m:
                notes.append(f"{d['model']} {run['recipe']['name']}: no prediction ({p.get('error')})")
                continue
            rows.append(f"| {d['model']} | {run['recipe']['name']} | {m['prefill_ms']:.1f} | {m['predicted_prefill_ms']:.1f} | "
                        f"{m['prefill_prediction_error_pct']:+.1f}% | {m['decode_tokens_per_s']:.2f} "
                        f"({run['details']['decode_tokens_per_s_min']:.2f}–{run['details']['decode_tokens_per_s_max']:.2f}) | "
                        f"{m['predicted_decode_tokens_per_s']:.2f} | {m['decode_prediction_error_pct']:+.1f}% | "
                        f"{p.get('bound', {}).get('decode', '–')} | {'yes' if p.get('calibrated') else 'no'} |")
        notes.append(f"{d['model']}: load average {d['environment'].get('load_average_before')} → "
                     f"{d['environment'].get('load_average_after')}")
    hw = load_hardware("local", threads=a.threads)
    cal = (f"calibrated {hw['calibration']['date']}{' (host was busy!)' if hw['calibration']['host_busy'] else ''}: fp32 GEMM {hw['peak_tflops']['fp32'] * 1e3:.1f} GFLOP/s, "
           f"fp32 GEMV read bandwidth {hw['memory_bandwidth_gbps']:.1f} GB/s, overhead {hw.get('overhead_us_per_layer', 0):.0f} µs "
           f"per decoder layer + {hw.get('overhead_us_per_model_step', 0):.0f} µs per step" if hw.get("calibrated")
           else "NOT calibrated (nominal local.yaml figures)")
    head = [f"Local profile: {cal}; {a.threads} threads; batch 1, prompt 128, gen 32, {a.repeats} repeats "
            "(measured: median and min–max over repeats).", "",
            "| model | recipe | prefill ms measured | predicted | error | decode tok/s measured (range) | predicted | error | "
            "decode bound | calibrated |", "|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows + [""] + [f"- {n}" for n in notes])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--recipes", default="baseline,rtn-w8,rtn-w4g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default="runs/bench-predict")
    ap.add_argument("--calibrate", action="store_true", help="run the local micro-benchmarks (idle machine) and exit")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from earlier runs")
    ap.add_argument("--write", default=None, help="markdown file to update (section predict-vs-measure)")
    a = ap.parse_args()
    if a.calibrate:
        from leanfm.predict.calibrate import calibrate_cli

        print(calibrate_cli(a.threads, force=True))
        return 0
    if not a.table_only:
        _measure(a)
    body = _table(a)
    print(body)
    if a.write:
        cmd = "python benchmarks/predict_vs_measure.py --write " + a.write
        write_section(a.write, "predict-vs-measure", f"Command: `{cmd}` (after `--calibrate` on the idle machine)\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
