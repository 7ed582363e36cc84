"""``leanfm predict``: roofline prediction of a recipe's effect on a model and hardware.

Needs no weights: the model is a config.json (path, built-in name such as ``llama-3.1-70b``, or a
leanfm alias). Prints a compact table; ``--json FILE`` writes the full prediction (the path is
checked before anything is computed, and written atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
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
    p.add_argument("--image-size", type=int, default=224,
                   help="vision and image-text models: square input side in pixels (default 224)")
    p.add_argument("--steps", type=int, default=4,
                   help="diffusion models: denoising steps per sample unless the recipe sets its own (default 4)")
    p.add_argument("--acceptance-rate", type=float, default=None,
                   help="speculative decoding: probability a draft token is accepted (default 0.6, flagged as assumed)")
    p.add_argument("--threads", type=int, default=2, help="local: the thread count whose calibration is used (default 2)")
    p.add_argument("--calibrate", action="store_true",
                   help="local: first run this machine's micro-benchmarks (~10 s; on an idle machine) and cache them")
    p.add_argument("--per-layer", action="store_true", help="print the per-op table of prefill and decode")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full prediction as JSON")
    p.add_argument("--tune", default=None, metavar="STEP",
                   help="training what-if instead of inference: a tuning step as METHOD[,field=value...], e.g. "
                        "lora,rank=8,batch=4,seqlen=512,checkpointing=true (leanfm methods lora lists the fields)")


def _bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def hardware_text(r: dict) -> str:
    """``h100-sxm (you asked for 'h100')`` when an alias was resolved, else the profile's name."""
    asked = r.get("hardware_requested")
    return f"{r['hardware']} (you asked for '{asked}')" if asked and asked != r["hardware"] else str(r["hardware"])


def render(r: dict, per_layer: bool = False) -> str:
    """The compact human-readable summary of a prediction dict. A setup that does not fit in the
    hardware's memory gets no speed verdict and no cost line (its times are what-if numbers)."""
    sp = r["speedup_vs_baseline"]
    fits = r.get("fits", True)
    whatif = "" if fits else "  [what-if: does not fit]"
    lines = [
        f"model      {r['model']} ({r['architecture']['params'] / 1e9:.2f}B params, {r['architecture']['layers']} layers)",
        f"recipe     {r['recipe']}" + ("  [simulated formats]" if r["simulated"] else ""),
        f"hardware   {hardware_text(r)} ({r['dtype']} dense)  batch {r['batch']}, prompt {r['prompt']}, gen {r['gen']}",
        f"memory     weights {_bytes(r['weight_bytes'])} + KV {_bytes(r['kv_cache_bytes'])} + activations "
        f"{_bytes(r['activation_bytes'])} = {_bytes(r['memory_total_bytes'])}: {r['fits_text']}",
        f"prefill    {_num(r['prefill_ms'])} ms ({r['bound']['prefill']}-bound){whatif}",
        f"decode     {_num(r['decode_tokens_per_s'])} tok/s, {_num(r['tpot_ms'])} ms/token ({r['bound']['decode']}-bound"
        + (f", {r['overhead_share']['decode']:.0%} fixed overhead" if r["overhead_share"]["decode"] > 0.005 else "") + ")" + whatif,
    ]
    if not fits or r["will_speed_up"] is None or r["energy_j_per_token"] is None:
        lines.append(f"verdict    {r.get('no_verdict_reason') or r['will_speed_up_reason']}")
    else:
        lines += [
            f"cost       {_num(r['energy_j_per_token'])} J/token, ${_num(r['usd_per_million_tokens'])} per 1M tokens, "
            f"{_num(r['co2_g_per_million_tokens'])} g CO2 per 1M tokens",
            f"vs base    decode {sp['decode']:.2f}x, prefill {sp['prefill']:.2f}x -> "
            f"{'WILL speed up' if r['will_speed_up'] else 'will NOT speed up'}: {r['will_speed_up_reason']}",
        ]
    lines += [
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


def check_output_path(arg: str, flag: str = "--json") -> Path:
    """The path ``flag`` names, checked before any work: not a directory, and its directory (or the
    nearest existing ancestor, when the rest is to be created) accepts a new file (probed with a
    temporary file, removed at once). One-line LeanfmError naming the path otherwise."""
    from ..errors import LeanfmError

    text = str(arg)
    if not text.strip():
        raise LeanfmError(f"{flag} needs a file path, got an empty string; pass e.g. {flag} prediction.json")
    path = Path(text).expanduser()
    if path.is_dir():
        raise LeanfmError(f"{flag} {text} is a directory; pass a file path such as {path / 'prediction.json'}")
    if path.exists() and not path.is_file():
        return path  # a device or pipe such as /dev/stdout: written as is
    anc = Path(os.path.realpath(path)).parent if path.is_symlink() else path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise LeanfmError(f"cannot write {flag} {text}: {anc} is not a directory; pass a path in a writable directory")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".leanfm-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LeanfmError(f"cannot write {flag} {text}: cannot create a file in {anc} ({e.strerror or type(e).__name__}); "
                          "pass a path in a writable directory") from None
    return path


def _mode(dest: Path) -> int:
    """The permissions a plain ``open(dest, "w")`` would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(data, path: Path, flag: str = "--json") -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file in the same directory and
    ``os.replace``, so a failure never leaves a half-written file (a device or pipe such as
    /dev/stdout is written directly). One-line LeanfmError on an OS error."""
    from ..errors import LeanfmError

    text = json.dumps(data, indent=2)
    try:
        if path.exists() and not path.is_file():  # /dev/stdout, a FIFO: nothing to replace
            with open(path, "w") as f:
                f.write(text)
            return path
        dest = Path(os.path.realpath(path)) if path.is_symlink() else path  # replace the file a link points to, not the link
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, _mode(dest))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise LeanfmError(f"cannot write {flag} {path}: {e.strerror or type(e).__name__}; pass a path in a writable directory") from None
    return path


def run(args: argparse.Namespace) -> int:
    from ..errors import LeanfmError
    from .analyzer import predict
    from .hardware import load_hardware

    if isinstance(args.threads, bool) or not isinstance(args.threads, int) or args.threads < 1:
        raise LeanfmError(f"--threads must be a positive integer, got {args.threads!r}")
    if args.model is None and not args.calibrate:
        raise LeanfmError("--model is required (a config.json path, a built-in config such as llama-3.1-70b, or an alias)")
    out = check_output_path(args.json) if args.json is not None and args.model is not None else None
    if args.calibrate:
        from .calibrate import calibrate_cli

        print(calibrate_cli(args.threads, force=True))
        if args.model is None:
            return 0
    hw = load_hardware(args.hardware, threads=args.threads)
    if getattr(args, "tune", None):
        return _tune_whatif(args, hw)
    from ..models.family import family_of_name
    from .families import predict_family, render_family

    family = family_of_name(args.model)
    if family != "causal-lm":  # a ViT, image-text model or denoiser: priced per image / per step
        for flag, v in (("--batch", args.batch), ("--image-size", args.image_size), ("--steps", args.steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LeanfmError(f"{flag} must be a whole number >= 1 (got {v!r})")
        p = predict_family(args.model, family, args.recipe, hw, args.batch, args.image_size, args.steps)
        if out is not None:
            write_json_atomic(p, out)
        print(render_family(p))
        if out is not None:
            print(f"wrote {out}")
        return 0
    r = predict(args.model, args.recipe, hw, batch=args.batch, prompt=args.prompt, gen=args.gen,
                acceptance_rate=args.acceptance_rate, dtype=args.dtype)
    if out is not None:  # written before printing: an error then never follows a printed prediction
        write_json_atomic(r, out)
    print(render(r, per_layer=args.per_layer))
    if out is not None:
        print(f"wrote {out}")
    return 0


def add_hardware_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``leanfm hardware`` (the list of built-in hardware profiles)."""
    p.add_argument("--json", action="store_true", help="print the profiles as a JSON list instead of a table")


def run_hardware(args: argparse.Namespace) -> int:
    """``leanfm hardware``: every built-in profile (name, aliases, kind, memory, bandwidth, peak
    TFLOPS, power, $/hour, gCO2/kWh, source file) as a table, or JSON with ``--json``."""
    from .hardware import print_hardware

    print_hardware(as_json=bool(getattr(args, "json", False)))
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


def parse_step(text: str) -> dict:
    """``lora,rank=8,checkpointing=true`` -> ``{"method": "lora", "rank": 8, "checkpointing": True}``."""
    import yaml

    from ..errors import LeanfmError

    method, *pairs = [x.strip() for x in text.split(",") if x.strip()] or [""]
    step: dict = {"method": method}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise LeanfmError(f"--tune {text!r}: {pair!r} is not field=value; write e.g. lora,rank=8,batch=4")
        step[key.strip()] = yaml.safe_load(value)
    return step


def _tune_whatif(args, hw: dict) -> int:
    from ..config import config_from_dict
    from ..errors import LeanfmError
    from .arch import load_arch
    from .training import plan_training

    cfg = config_from_dict(parse_step(args.tune))
    if cfg.produces != "tuned-weights":
        raise LeanfmError(f"--tune {cfg.method}: not a fine-tuning method; use lora, dora, qlora, full, kd or mezo")
    cfg.validate()
    arch = load_arch(args.model)
    half = args.dtype in ("bf16", "fp16")
    plan = plan_training(arch, cfg, hardware=hw, dtype=args.dtype if half else "fp32")
    print(plan.describe().replace("training plan", f"{arch.name} on {hw.get('name')}: training plan", 1))
    tokens = cfg.batch * cfg.seqlen
    print(f"trainable parameters {plan.trainable_params:,}; {plan.flops_per_step / 1e12:.2f} TFLOP per step of "
          f"{tokens} tokens" + (f", {tokens / plan.step_seconds:,.0f} training tokens/s at {MFU_TEXT}" if plan.step_seconds else ""))
    mem = hw.get("memory_gb")
    if mem:
        fits = plan.peak <= mem * 1e9
        print(f"{'fits in' if fits else 'does not fit in'} the {mem:g} GB of {hw.get('name')}"
              + ("" if fits else ": try checkpointing=true, optimizer=adamw8bit, a LoRA method, or a smaller batch/seqlen"))
    return 0


MFU_TEXT = "the nominal utilization of leanfm.predict.training.MFU"
