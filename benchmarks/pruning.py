"""Pruning and low-rank benchmark: quality, size, FLOPs and measured speed per recipe.

    python benchmarks/pruning.py --phase quality --tag p1 --recipes baseline,magnitude50,wanda50,sparsegpt50
    python benchmarks/pruning.py --phase speed                 # run alone on an idle machine
    python benchmarks/pruning.py --phase kernels               # dense vs CSR per layer shape, idle machine
    python benchmarks/pruning.py --phase table --write docs/benchmarks.md

Quality and speed phases are those of ``benchmarks/quantization.py`` (same protocol: WikiText-2
test, seqlen 2048, fidelity on the first ``--fidelity-tokens``, gensim-wiki calibration; speed
side by side in one run, pinned threads), with results under ``--out-dir`` (runs/bench-prune).
Kernels phase: for each distinct linear shape of the model, time ``F.linear`` on the dense
weight against ``torch.sparse.mm`` on its CSR form at 50% unstructured and 2:4 sparsity, one
token (decode) and 128 tokens (prefill), interleaved repeats, median and spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantization as Q  # noqa: E402
from _mdsection import write_section  # noqa: E402

SPEED_RECIPES = ("baseline,magnitude50,benchmarks/recipes/magnitude50-csr.yaml,benchmarks/recipes/magnitude-2:4-csr.yaml,"
                 "layerdrop25,width25,svd70,asvd70,layerdrop25+rtn-w8")


def _kernels(a) -> None:
    import torch
    import torch.nn.functional as F

    import leanfm
    from leanfm.methods.prune.masks import magnitude_scores, nm_mask, unstructured_mask

    torch.set_num_threads(a.threads)
    model, _ = leanfm.load(a.model)
    shapes = sorted({tuple(m.weight.shape) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
    layers = {s: next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == s) for s in shapes}
    rows = []
    for shape, lin in layers.items():
        w = lin.weight.detach()
        for pattern in ("50%", "2:4"):
            sc = magnitude_scores(w)
            mask = unstructured_mask(sc, 0.5, per_row=False) if pattern == "50%" else nm_mask(sc, 2, 4)
            wp = w * mask
            csr = wp.to_sparse_csr()
            for tokens in (1, 128):
                x = torch.randn(tokens, shape[1])
                fns = {"dense": lambda: F.linear(x, wp), "csr": lambda: torch.sparse.mm(csr, x.t())}
                times = {k: [] for k in fns}
                for r in range(a.repeats + 1):
                    for k, f in fns.items():
                        n = 200 if tokens == 1 else 20
                        t0 = time.perf_counter()
                        for _ in range(n):
                            f()
                        if r:
                            times[k].append((time.perf_counter() - t0) / n * 1e6)
                d, c = statistics.median(times["dense"]), statistics.median(times["csr"])
                rows.append({"shape": list(shape), "pattern": pattern, "tokens": tokens, "dense_us": d, "csr_us": c,
                             "dense_us_min": min(times["dense"]), "dense_us_max": max(times["dense"]),
                             "csr_us_min": min(times["csr"]), "csr_us_max": max(times["csr"]), "csr_speedup": d / c})
                print(f"{shape} {pattern} tokens={tokens}: dense {d:.1f} us, csr {c:.1f} us, csr speedup {d / c:.2f}x", flush=True)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"threads": a.threads, "repeats": a.repeats, "torch": torch.__version__, "rows": rows}, indent=1))


def _kernel_table(out: Path) -> str:
    p = out / "kernels.json"
    if not p.exists():
        return ""
    d = json.loads(p.read_text())
    lines = ["| layer [out, in] | pattern | tokens | dense µs (min–max) | CSR µs (min–max) | CSR speedup |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['shape']} | {r['pattern']} | {r['tokens']} | {r['dense_us']:.1f} ({r['dense_us_min']:.1f}–{r['dense_us_max']:.1f}) | "
                     f"{r['csr_us']:.1f} ({r['csr_us_min']:.1f}–{r['csr_us_max']:.1f}) | {r['csr_speedup']:.2f}× |")
    return (f"Sparse kernels on this CPU (`--phase kernels`: torch {d['torch']}, {d['threads']} threads, {d['repeats']} interleaved "
            "repeats, median): dense `F.linear` on the masked weight vs `torch.sparse.mm` on its CSR form. torch has no CPU "
            "semi-structured (2:4) kernel, so 2:4 runs as CSR too.\n\n" + "\n".join(lines))


def _table(a) -> str:
    out = Path(a.out_dir)
    q, s = Q._runs(out, "quality"), Q._runs(out, "speed")
    base_q = q.get("baseline", {}).get("metrics", {})
    base_s = s.get("baseline", {}).get("metrics", {})
    names = list(q) + [n for n in s if n not in q]
    lines = ["| recipe | perplexity | ppl_increase | top1_agreement | weight_bytes (MB) | vs fp32 | flops/token (M) | decode tok/s (min–max) | speedup | prefill ms | apply s | simulated | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        qm = q.get(n, {}).get("metrics", {})
        sr = s.get(n, {})
        sm, sd = sr.get("metrics", {}), sr.get("details", {})
        flags = sr.get("flags", {}) or q.get(n, {}).get("flags", {})
        tps = sm.get("decode_tokens_per_s")
        spread = f" ({Q._fmt(sd.get('decode_tokens_per_s_min'), '.1f')}–{Q._fmt(sd.get('decode_tokens_per_s_max'), '.1f')})" if tps else ""
        wb = sm.get("weight_bytes")
        lines.append(
            f"| {n} | {Q._fmt(qm.get('perplexity'), '.3f')} | {Q._fmt(qm.get('ppl_increase'), '+.2%') if n != 'baseline' else '–'} | "
            f"{Q._fmt(qm.get('top1_agreement'), '.4f')} | {Q._fmt(wb and wb / 1e6, '.1f')} | "
            f"{Q._fmt(wb / base_s['weight_bytes'] if wb and base_s.get('weight_bytes') else None, '.3f')} | "
            f"{Q._fmt(sm.get('flops_per_token') and sm['flops_per_token'] / 1e6, '.1f')} | {Q._fmt(tps, '.2f')}{spread} | "
            f"{Q._fmt(tps / base_s['decode_tokens_per_s'] if tps and base_s.get('decode_tokens_per_s') else None, '.2f')} | "
            f"{Q._fmt(sm.get('prefill_ms'), '.0f')} | {Q._fmt(q.get(n, sr).get('apply_seconds'), '.0f')} | "
            f"{'yes' if flags.get('simulated') else 'no'} | {Q._short_kernel(flags.get('kernel', '–'))} |")
    head = []
    any_q, any_s = next(iter(q.values()), None), next(iter(s.values()), None)
    if any_q:
        p = any_q["_protocol"]
        fid = next((r["details"]["fidelity_tokens"] for r in q.values() if r["details"].get("fidelity_tokens")), None)
        cal = next((r.get("calibration") for r in q.values() if r.get("calibration")), None)
        cal = f"{cal['dataset']} {cal['n']} x {cal['seqlen']} tokens (seed {cal['seed']})" if cal else "none needed"
        head.append(f"Quality: WikiText-2 {p['split']}, {any_q['metrics'].get('eval_tokens')} scored tokens, seqlen {p['seqlen']}; "
                    f"top1_agreement on the first {fid}; calibration {cal}; threads "
                    f"{'/'.join(sorted({str(r['_env'].get('threads')) for r in q.values()}))} (per batch); baseline perplexity "
                    f"{Q._fmt(base_q.get('perplexity'), '.3f')}.")
    if any_s:
        p, env = any_s["_protocol"], any_s["_env"]
        head.append(f"Speed: one run, batch {p['batch']}, prompt {p['prompt']}, {p['gen']} decode steps × {p['repeats']} repeats after "
                    f"{p['warmup']} warm-up, {env.get('threads')} threads, load average before/after "
                    f"{env.get('load_average_before')} / {env.get('load_average_after')}. `simulated: yes` = masked zeros in a "
                    "dense weight: its speed and bytes are the dense model's, by construction.")
    kt = _kernel_table(out)
    return "\n\n".join(head + ["\n".join(lines)] + ([kt] if kt else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["quality", "speed", "kernels", "table"], required=True)
    Q.add_common_args(ap, "runs/bench-prune", "pruning")
    a = ap.parse_args()
    if a.phase == "quality":
        Q._quality(a)
    elif a.phase == "speed":
        a.recipes = a.recipes or SPEED_RECIPES
        Q._speed(a)
    elif a.phase == "kernels":
        _kernels(a)
    else:
        body = _table(a)
        print(body)
        if a.write:
            cmd = "python benchmarks/pruning.py --phase table --write " + a.write
            write_section(a.write, f"pruning-{a.model}", f"Command: `{cmd}` (after the quality/speed/kernels phases)\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
