"""Compressing models larger than memory (issue 16): peak RSS and wall time vs model size.

    python benchmarks/make_large_checkpoint.py --shape 1b --out ~/.cache/leanfm/large/llama-1b-shaped
    python benchmarks/make_large_checkpoint.py --shape 7b --out ~/.cache/leanfm/large/llama-7b-shaped
    python benchmarks/scale.py [--models smollm2-135m,~/.cache/leanfm/large/llama-1b-shaped,...] [--threads 2]
        [--calib-samples 16] [--calib-seqlen 512] [--max-memory 6GB] [--compare-in-memory]

For each model, one ``leanfm compress --onload always`` (GPTQ int4: groups of 128 where they
divide every width, else 64) under ``/usr/bin/time -v``, then ``leanfm eval`` of the written
checkpoint (WikiText-2 test, a few windows: it must load and run a forward in the same budget).
Prints per model: parameters, source size on disk, the memory plan's peak, the measured peak RSS
of both commands (the kernel's maximum resident set), their ratio, wall times and perplexity.
``--compare-in-memory`` also compresses the first model in memory (same calibration; GPTQ, and the
``--compare-recipes``, RTN by default, both ways) and checks
that every tensor of the two checkpoints is identical and that perplexity agrees.

Each command runs alone (the machine must be otherwise idle for the wall times to mean much);
``--threads`` is recorded with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its output, exit code, peak RSS (bytes) and wall seconds."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {"out": p.stdout, "rc": p.returncode, "peak": int(m.group(1)) * 1024 if m else None, "wall": wall}


def model_path(name: str) -> Path:
    from leanfm.models.load import resolve

    return Path(resolve(os.path.expanduser(name))[0])


def group_for(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    widths = [cfg["hidden_size"], cfg["intermediate_size"]]
    return 128 if all(w % 128 == 0 for w in widths) else 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,~/.cache/leanfm/large/llama-1b-shaped,~/.cache/leanfm/large/llama-7b-shaped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-memory", default="6GB")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--compare-in-memory", action="store_true")
    ap.add_argument("--compare-recipes", default="rtn-w4g64", help="with --compare-in-memory: recipes compared besides the GPTQ one")
    a = ap.parse_args()
    leanfm = str(Path(sys.executable).with_name("leanfm"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(m.strip() for m in a.models.split(",") if m.strip()):
        src = model_path(name)
        gs = group_for(src)
        recipe = f"gptq-w4g{gs}"
        ck = out / f"{src.name}-{recipe}"
        common = ["--recipe", recipe, "--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen),
                  "--threads", str(a.threads), "--overwrite"]
        c = timed([leanfm, "compress", "--model", str(src), "--out", str(ck), "--onload", "always", "--max-memory", a.max_memory, *common])
        planned = float(re.search(r"planned ([0-9.]+) GB", c["out"]).group(1)) * 1e9
        ev = _eval(leanfm, ck, out / f"eval-{src.name}", a)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        rows.append({"model": name, "source_gb": size / 1e9, "dtype": _stored_dtypes(src), "recipe": recipe,
                     "planned_gb": planned / 1e9, "compress_peak_gb": c["peak"] / 1e9, "ratio": c["peak"] / planned,
                     "compress_s": c["wall"], "eval_peak_gb": ev["peak"] / 1e9, "eval_s": ev["wall"], "ppl": ev["ppl"],
                     "out_gb": sum(f.stat().st_size for f in ck.glob("*.safetensors")) / 1e9})
        print(json.dumps(rows[-1]), flush=True)
        if a.compare_in_memory and i == 0:
            for other in [r for r in a.compare_recipes.split(",") if r and r != recipe]:  # calibration-free ones, quick
                flags = ["--recipe", other, *common[2:]]
                on, mem = out / f"{src.name}-{other}", out / f"{src.name}-{other}-in-memory"
                co = timed([leanfm, "compress", "--model", str(src), "--out", str(on), "--onload", "always", "--max-memory", a.max_memory, *flags])
                cm = timed([leanfm, "compress", "--model", str(src), "--out", str(mem), "--onload", "never", *flags])
                e_on, e_mem = _eval(leanfm, on, out / f"eval-{src.name}-{other}", a), _eval(leanfm, mem, out / f"eval-{src.name}-{other}-in-memory", a)
                _compare(name, other, on, mem, co, cm, e_on, e_mem)
            mem = out / f"{src.name}-{recipe}-in-memory"
            cm = timed([leanfm, "compress", "--model", str(src), "--out", str(mem), "--onload", "never", *common])
            _compare(name, recipe, ck, mem, c, cm, ev, _eval(leanfm, mem, out / f"eval-{src.name}-in-memory", a))
    print(f"\nthreads {a.threads}; calibration {a.calib_samples} x {a.calib_seqlen} tokens of gensim-wiki; --max-memory {a.max_memory}; "
          f"eval: WikiText-2 test, first {a.eval_tokens} tokens\n")
    print("| model | source | recipe | plan peak | compress peak RSS | measured / plan | compress wall | eval peak RSS | eval wall | ppl | output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['source_gb']:.2f} GB {r['dtype']} | {r['recipe']} | {r['planned_gb']:.2f} GB | {r['compress_peak_gb']:.2f} GB | "
              f"{r['ratio']:.2f} | {r['compress_s']:.0f} s | {r['eval_peak_gb']:.2f} GB | {r['eval_s']:.0f} s | {r['ppl']:.3f} | {r['out_gb']:.2f} GB |")


def _stored_dtypes(path: Path) -> str:
    """The dtypes of the stored tensors (config.json's ``dtype`` may say otherwise)."""
    from leanfm.formats.tensorfiles import TensorIndex

    idx = TensorIndex(path)
    return "/".join(sorted({str(idx.dtype(n)).replace("torch.", "") for n in idx.names()}))


def _compare(name: str, recipe: str, on: Path, mem: Path, c_on: dict, c_mem: dict, e_on: dict, e_mem: dict) -> None:
    print(f"in-memory vs onloaded, {recipe} on {name}: {_same(on, mem)}; perplexity {e_mem['ppl']} vs {e_on['ppl']}; peak RSS "
          f"{c_mem['peak'] / 1e9:.2f} GB in memory vs {c_on['peak'] / 1e9:.2f} GB onloaded; wall {c_mem['wall']:.0f} s vs {c_on['wall']:.0f} s",
          flush=True)


def _eval(leanfm: str, ck: Path, out: Path, a) -> dict:
    r = timed([leanfm, "eval", "--model", str(ck), "--out", str(out), "--overwrite", "--metrics", "quality",
               "--max-eval-tokens", str(a.eval_tokens), "--seqlen", "512", "--threads", str(a.threads)])
    res = json.loads((out / "results.json").read_text())
    r["ppl"] = res["runs"][0]["metrics"]["perplexity"]
    return r


def _same(a: Path, b: Path) -> str:
    import torch

    from leanfm.formats.tensorfiles import TensorIndex

    ia, ib = TensorIndex(a), TensorIndex(b)
    if sorted(ia.names()) != sorted(ib.names()):
        return f"different tensor names ({len(set(ia.names()) ^ set(ib.names()))} differ)"
    diff = [n for n in ia.names() if not torch.equal(ia.read(n), ib.read(n))]
    codes = sum(n.endswith(".qweight") for n in ia.names())
    return f"{len(ia.names())} tensors ({codes} packed code tensors), {len(diff)} differ" + (f": {diff[:3]}" if diff else "")


if __name__ == "__main__":
    main()
