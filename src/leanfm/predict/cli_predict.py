"""``leanfm predict``: roofline prediction of a recipe's effect on a model and hardware.

Needs no weights: the model is a config.json (path, built-in name such as ``llama-3.1-70b``, or a
leanfm alias). Prints a compact table; ``--json FILE`` writes the full prediction.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="config.json path or directory, built-in config (llama-3.1-70b, qwen2.5-72b, ...) or leanfm alias")
    p.add_argument("--recipe", default="baseline", help="built-in recipe, a+b composition or YAML path (default baseline)")
    p.add_argument("--hardware", default="local", help="hardware profile name (h100, a100, local, ...) or YAML path (default local)")
    p.add_argument("--dtype", default=None,
                   help="dense dtype of the baseline: fp32, bf16, fp16, fp8 (default: the hardware's, bf16 on GPUs, fp32 on CPUs)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--gen", type=int, default=32, help="generated tokens (default 32)")
    p.add_argument("--acceptance-rate", type=float, default=None,
                   help="speculative decoding: probability a draft token is accepted (default 0.6, flagged as assumed)")
    p.add_argument("--threads", type=int, default=2, help="local: the thread count whose calibration is used (default 2)")
    p.add_argument("--calibrate", action="store_true",
                   help="local: first run this machine's micro-benchmarks (~10 s; on an idle machine) and cache them")
    p.add_argument("--per-layer", action="store_true", help="print the per-op table of prefill and decode")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full prediction as JSON")


def _bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(r: dict, per_layer: bool = False) -> str:
    """The compact human-readable summary of a prediction dict."""
    sp = r["speedup_vs_baseline"]
    lines = [
        f"model      {r['model']} ({r['architecture']['params'] / 1e9:.2f}B params, {r['architecture']['layers']} layers)",
        f"recipe     {r['recipe']}" + ("  [simulated formats]" if r["simulated"] else ""),
        f"hardware   {r['hardware']} ({r['dtype']} dense)  batch {r['batch']}, prompt {r['prompt']}, gen {r['gen']}",
        f"memory     weights {_bytes(r['weight_bytes'])} + KV {_bytes(r['kv_cache_bytes'])} + activations "
        f"{_bytes(r['activation_bytes'])} = {_bytes(r['memory_total_bytes'])}: {r['fits_text']}",
        f"prefill    {_num(r['prefill_ms'])} ms ({r['bound']['prefill']}-bound)",
        f"decode     {_num(r['decode_tokens_per_s'])} tok/s, {_num(r['tpot_ms'])} ms/token ({r['bound']['decode']}-bound"
        + (f", {r['overhead_share']['decode']:.0%} fixed overhead" if r["overhead_share"]["decode"] > 0.005 else "") + ")",
        f"cost       {_num(r['energy_j_per_token'])} J/token, ${_num(r['usd_per_million_tokens'])} per 1M tokens, "
        f"{_num(r['co2_g_per_million_tokens'])} g CO2 per 1M tokens",
        f"vs base    decode {sp['decode']:.2f}x, prefill {sp['prefill']:.2f}x -> "
        f"{'WILL speed up' if r['will_speed_up'] else 'will NOT speed up'}: {r['will_speed_up_reason']}",
        "batch      " + "  ".join(f"{c['batch']}:{_num(c['decode_tokens_per_s'])}" + ("" if c["fits"] else "(no fit)")
                                  for c in r["throughput_vs_batch"]) + "  (decode tok/s)",
    ]
    if r.get("speculative"):
        s = r["speculative"]
        lines.append(f"speculate  k={s['k']}, acceptance {s['acceptance_rate']:g}: {s['tokens_per_round']:.2f} tokens/round, "
                     f"round {_num(s['round_ms'])} ms (draft step {_num(s['draft_step_ms'])} ms, verify {_num(s['verify_ms'])} ms)")
    if per_layer:
        for phase in ("prefill", "decode"):
            lines.append(f"\n{phase} (per layer; x count = layers sharing the row)")
            lines.append(f"{'layers':>9} {'x':>3} {'op':<22} {'format':<10} {'GFLOP':>9} {'MB read':>9} {'FLOP/B':>8} {'bound':<8} {'ms':>9}")
            for row in r["per_layer"][phase]:
                ai = "-" if row["intensity"] is None else f"{row['intensity']:.1f}"
                lines.append(f"{row['layers'][:9]:>9} {row['count']:>3} {row['op']:<22} {row['format']:<10} {row['flops'] / 1e9:>9.4g} "
                             f"{row['bytes'] / 1e6:>9.4g} {ai:>8} {row['bound']:<8} {row['time_ms']:>9.4g}")
    lines.append("assumptions: " + "; ".join(r["assumptions"][:3]) + (f" (+{len(r['assumptions']) - 3} more in --json)" if len(r["assumptions"]) > 3 else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..errors import LeanfmError
    from .analyzer import predict
    from .hardware import load_hardware

    if args.calibrate:
        from .calibrate import calibrate_cli

        print(calibrate_cli(args.threads, force=True))
        if args.model is None:
            return 0
    if args.model is None:
        raise LeanfmError("--model is required (a config.json path, a built-in config such as llama-3.1-70b, or an alias)")
    hw = load_hardware(args.hardware, threads=args.threads)
    r = predict(args.model, args.recipe, hw, batch=args.batch, prompt=args.prompt, gen=args.gen,
                acceptance_rate=args.acceptance_rate, dtype=args.dtype)
    print(render(r, per_layer=args.per_layer))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2))
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m leanfm.predict.cli_predict``); ``leanfm predict`` wires the same two functions."""
    import sys

    from ..errors import LeanfmError

    p = argparse.ArgumentParser(prog="leanfm predict", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except LeanfmError as e:
        sys.stderr.write(f"leanfm predict: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
