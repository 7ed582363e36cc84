"""Decoding and KV-cache benchmark (issue 5). Phases:

    python benchmarks/decoding.py --phase streaming [--tokens 8192] [--budget 512] [--sinks 4] [--rows full,sinks,...]
    python benchmarks/decoding.py --phase passkey [--lengths 1024,2048,4096] [--trials 5] [--budget 512]
    python benchmarks/decoding.py --phase early-exit [--thresholds 0.2,0.4,...] [--gen 64]
    python benchmarks/decoding.py --phase speculative [--gen 64] [--prompts 4]
    python benchmarks/decoding.py --phase table --write docs/benchmarks.md

streaming: the first ``--tokens`` tokens of WikiText-2 test as one stream. Full cache: one
forward over the whole stream (the same scores as decoding it token by token with an unbounded
cache). StreamingLLM (sinks + recent window, ``--budget`` entries per layer) and window-only (the
same budget, no sinks) decode it one token at a time with the bounded cache, with positions
inside the cache (the paper's scheme, leanfm's default) and, for comparison, original positions;
each reports perplexity and the largest ``kv_cache_bytes`` seen. Writes OUT/streaming-BUDGET.json.

passkey: synthetic passkey retrieval (a 5-digit key hidden at a random depth in filler) per KV
policy (full, StreamingLLM, H2O, SnapKV at ``--budget``) and context length; accuracy over
``--trials`` keys. Writes OUT/passkey.json.

early-exit: CALM softmax-margin early exit. Per threshold, teacher-forced top-1 agreement with the
full model on WikiText-2 (``--fidelity-tokens`` after a 64-token prefix) and mean layers used;
then, for the lowest threshold whose agreement is >= 0.95 (and the thresholds in ``--speed-at``),
measured greedy decode speed against plain greedy, alternating runs. Writes OUT/early_exit.json.

speculative: greedy self-speculative decoding (layer-skip draft, layers chosen by block
influence on gensim-wiki calibration) and prompt-lookup decoding on ``--prompts`` WikiText-2
prompts of 128 tokens, ``--gen`` new tokens each; acceptance rate, mean accepted length and the
measured end-to-end speedup against plain greedy, alternating runs; whether the tokens equal plain
greedy's. Writes OUT/speculative-skipF.json (F = ``--skip-fraction``).

Threads are fixed by ``--threads`` (default 2) and recorded in every JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdsection import write_section  # noqa: E402


def _save(a, name: str, payload: dict) -> None:
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"model": a.model, "threads": a.threads, **payload}, indent=1))


def _setup(a):
    import leanfm
    from leanfm.data.text import load_text

    torch.set_num_threads(a.threads)
    model, tok = leanfm.load(a.model)
    ids = tok(load_text("wikitext2", "test"), return_tensors="pt").input_ids[0]
    return leanfm, model, tok, ids


def _streaming(a) -> None:
    from leanfm.measure.long_context import sliding_window_perplexity, stream_perplexity

    leanfm, model, tok, ids = _setup(a)
    ids = ids[: a.tokens]
    S = leanfm.StreamingLLMConfig
    cases = {
        "full": ("full cache", None, ids.numel()),
        "sinks": (f"streaming_llm budget {a.budget}, sinks {a.sinks}, cache positions", S(budget=a.budget, sinks=a.sinks), 1),
        "window": (f"window only, budget {a.budget} (sinks 0), cache positions", S(budget=a.budget, sinks=0), 1),
        "sinks-original": (f"streaming_llm budget {a.budget}, sinks {a.sinks}, original positions",
                           S(budget=a.budget, sinks=a.sinks, positions="original"), 1),
        "window-original": (f"window only, budget {a.budget} (sinks 0), original positions",
                            S(budget=a.budget, sinks=0, positions="original"), 1),
        "h2o": (f"h2o budget {a.budget}, recent 0.5", leanfm.H2OConfig(budget=a.budget), 1),
    }
    cases["recompute"] = (f"sliding window with re-computation, window {a.budget} (stride {a.recompute_stride})", None, None)
    prev = Path(a.out_dir) / f"streaming-{a.budget}.json"
    rows = json.loads(prev.read_text())["rows"] if prev.exists() else {}
    for key in a.rows.split(","):
        name, factory, chunk = cases[key]
        t0 = time.perf_counter()
        with torch.no_grad():
            if key == "recompute":  # the paper's oracle: every token from its last `budget` tokens, recomputed
                r = sliding_window_perplexity(model, ids, a.budget, a.recompute_stride)
            else:
                r = stream_perplexity(model, ids, factory, chunk=chunk)
        r["seconds"] = time.perf_counter() - t0
        rows[name] = r
        print(f"{name}: ppl {r['perplexity']:.3f}, kv_cache_bytes {r.get('kv_cache_bytes', 0) / 1e6:.1f} MB, {r['seconds']:.0f} s", flush=True)
        _save(a, f"streaming-{a.budget}.json", {"tokens": int(ids.numel()), "rows": rows})


def _passkey(a) -> None:
    from leanfm.measure.long_context import passkey_accuracy

    leanfm, model, tok, _ = _setup(a)
    lengths = [int(x) for x in a.lengths.split(",")]
    policies = {
        "full cache": None,
        f"streaming_llm {a.budget} (4 sinks)": leanfm.StreamingLLMConfig(budget=a.budget, sinks=4),
        f"h2o {a.budget}": leanfm.H2OConfig(budget=a.budget),
        f"snapkv {a.budget} (whole-prompt prefill)": leanfm.SnapKVConfig(budget=a.budget),
    }
    rows = {}
    for name, pol in policies.items():
        t0 = time.perf_counter()
        chunk = None if name.startswith("snapkv") or pol is None else 256  # SnapKV compresses a whole prompt
        with torch.no_grad():
            r = passkey_accuracy(model, tok, pol, context_lengths=lengths, trials=a.trials, seed=0, prefill_chunk=chunk)
        r["prefill_chunk"] = chunk
        r["seconds"] = time.perf_counter() - t0
        rows[name] = r
        print(name, r["accuracy"], f"{r['seconds']:.0f} s", flush=True)
        _save(a, "passkey.json", {"rows": rows})


def _ee_key(r: dict) -> tuple:
    return (r["criterion"], r["threshold"], r["min_layer"], r["check_every"])


def _early_exit(a) -> None:
    from leanfm.methods.decoding.early_exit import early_exit_fidelity
    from leanfm.measure.decoding import measure_speedup
    from leanfm.methods.decoding.policy import EarlyExitPolicy

    leanfm, model, tok, ids = _setup(a)
    text = ids[None, 10_000: 10_000 + 64 + a.fidelity_tokens]
    prev = Path(a.out_dir) / "early_exit.json"
    rows = {_ee_key(r): r for r in json.loads(prev.read_text())["rows"]} if prev.exists() else {}
    from leanfm.methods.layers import decoder_layers

    n_layers = len(decoder_layers(model))
    min_layer = a.min_layer if a.min_layer is not None else n_layers // 2
    base = {"criterion": a.criterion, "min_layer": min_layer, "check_every": a.check_every}

    def save():
        _save(a, "early_exit.json", {"fidelity_tokens": a.fidelity_tokens, "gen": a.gen,
                                     "rows": sorted(rows.values(), key=_ee_key)})

    thresholds = [float(x) for x in a.thresholds.split(",")]
    for th in thresholds if a.part != "speed" else []:
        with torch.no_grad():
            r = early_exit_fidelity(model, text, prefix=64, threshold=th, min_layer=min_layer,
                                    check_every=a.check_every, criterion=a.criterion)
        row = {**base, "threshold": th, **{k: v for k, v in r.items() if k not in base}}
        rows[_ee_key(row)] = {**rows.get(_ee_key(row), {}), **row}
        print(f"{a.criterion} threshold {th} (min_layer {min_layer}, every {a.check_every}): top1 {r['top1_agreement']:.3f}, "
              f"mean layers {r['mean_layers_used']:.2f}/{r['n_layers']}, checks/token {r['checks_per_token']:.2f}", flush=True)
        save()
    if a.part == "fidelity":
        return
    mine = [r for r in rows.values() if (r["criterion"], r["min_layer"], r["check_every"]) == tuple(base.values())]
    ok = [r["threshold"] for r in mine if r.get("top1_agreement", 0) >= 0.95]
    speed_at = sorted(({min(ok)} if ok else set()) | {float(x) for x in a.speed_at.split(",") if x})
    prompt = ids[None, 20_000: 20_000 + 128]
    for th in speed_at:
        cfg = leanfm.EarlyExitConfig(threshold=th, min_layer=min_layer, check_every=a.check_every, criterion=a.criterion)
        with torch.no_grad():
            s = measure_speedup(model, prompt, a.gen, repeats=a.repeats, warmup=1, policy=EarlyExitPolicy(cfg))
        key = (a.criterion, th, min_layer, a.check_every)
        rows[key] = {**rows.get(key, {**base, "threshold": th}), "speed": s}
        print(f"threshold {th}: speedup {s['speedup']:.3f} (plain {s['plain_tokens_per_s']:.2f} tok/s, "
              f"policy {s['policy_tokens_per_s']:.2f}), mean layers {s['mean_layers_used']:.2f}", flush=True)
        save()


def _speculative(a) -> None:
    from leanfm.data.calib import calibration
    from leanfm.methods.decoding.drafts import skip_by_influence
    from leanfm.measure.decoding import measure_speedup
    from leanfm.methods.decoding.policy import SpeculativePolicy

    leanfm, model, tok, ids = _setup(a)
    calib = calibration("gensim-wiki", n=a.calib_n, seqlen=a.calib_seqlen, seed=0).tokens(tok)
    with torch.no_grad():
        skip, bi = skip_by_influence(model, calib, a.skip_fraction)
    print(f"self draft skips {len(skip)} layers: {skip}", flush=True)
    drafts = a.drafts.split(",")
    configs = {f"self k={k} (skip {len(skip)})": (leanfm.SpeculativeConfig(draft="self", k=k, skip_layers=tuple(skip)), skip)
               for k in (2, 4) if "self" in drafts}
    if "prompt_lookup" in drafts:
        configs["prompt_lookup k=4"] = (leanfm.SpeculativeConfig(draft="prompt_lookup", k=4), None)
    prompts = [ids[None, 30_000 + i * 2_000: 30_000 + i * 2_000 + 128] for i in range(a.prompts)]
    rows = {}
    for name, (cfg, sk) in configs.items():
        per = []
        for p in prompts:
            with torch.no_grad():
                per.append(measure_speedup(model, p, a.gen, repeats=a.repeats, warmup=1, policy=SpeculativePolicy(cfg, sk)))
        agg = {
            "acceptance_rate": sum(r["accepted"] for r in per) / max(1, sum(r["proposed"] for r in per)),
            "mean_accepted_length": sum(r["accepted"] for r in per) / max(1, sum(r["rounds"] for r in per)),
            "speedup_median": statistics.median(r["speedup"] for r in per),
            "speedup_min": min(r["speedup"] for r in per), "speedup_max": max(r["speedup"] for r in per),
            "plain_s_total": sum(r["plain_s"] for r in per), "policy_s_total": sum(r["policy_s"] for r in per),
            "matches_plain": all(r["matches_plain"] for r in per), "per_prompt": per,
        }
        agg["speedup_total"] = agg["plain_s_total"] / agg["policy_s_total"]
        rows[name] = agg
        print(f"{name}: acceptance {agg['acceptance_rate']:.3f}, accepted/round {agg['mean_accepted_length']:.2f}, "
              f"speedup {agg['speedup_total']:.3f} ({agg['speedup_min']:.2f}-{agg['speedup_max']:.2f}), "
              f"matches plain {agg['matches_plain']}", flush=True)
        _save(a, f"speculative-skip{a.skip_fraction:g}.json", {"gen": a.gen, "prompts": a.prompts, "skip_layers": skip,
                                      "block_influence": bi, "rows": rows})


def _fmt_mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def _table(a) -> str:
    out, parts = Path(a.out_dir), []
    for f in sorted(out.glob("streaming-*.json")):
        d = json.loads(f.read_text())
        full = next((r for n, r in d["rows"].items() if n == "full cache"), None)
        lines = [f"**Long stream** ({d['tokens']} WikiText-2 test tokens, one stream, {d['threads']} threads)", "",
                 "| cache | perplexity | vs full | kv_cache_bytes (max) |", "|---|---|---|---|"]
        for n, r in d["rows"].items():
            rel = f"{(r['perplexity'] / full['perplexity'] - 1) * 100:+.1f}%" if full else "–"
            kv = _fmt_mb(r["kv_cache_bytes"]) if "kv_cache_bytes" in r else "– (no cache)"
            lines.append(f"| {n} | {r['perplexity']:.3f} | {rel} | {kv} |")
        parts.append("\n".join(lines))
    f = out / "passkey.json"
    if f.exists():
        d = json.loads(f.read_text())
        lengths = list(next(iter(d["rows"].values()))["accuracy"])
        lines = [f"**Passkey retrieval** (accuracy over {next(iter(d['rows'].values()))['trials']} keys per length; "
                 "bounded policies prefill in 256-token chunks except SnapKV)", "",
                 "| policy | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for n, r in d["rows"].items():
            lines.append(f"| {n} | " + " | ".join(f"{r['accuracy'][k]:.2f}" for k in lengths) + " |")
        parts.append("\n".join(lines))
    f = out / "early_exit.json"
    if f.exists():
        d = json.loads(f.read_text())
        lines = [f"**Early exit** (CALM: softmax = top-1 minus top-2 probability through the LM head, state = cosine of "
                 f"consecutive hidden states; fidelity = teacher-forced top-1 "
                 f"agreement with the full model over {d['fidelity_tokens']} WikiText-2 tokens; speed: greedy, 128-token "
                 f"prompt, {d.get('gen', '–')} new tokens, alternating with plain greedy, {d['threads']} threads)", "",
                 "| criterion | checks at layers | threshold | top1_agreement | mean layers used | early-exit rate | decode speedup |",
                 "|---|---|---|---|---|---|---|"]
        for r in sorted(d["rows"], key=lambda r: (r["criterion"], r["min_layer"], r["check_every"], r["threshold"])):
            s = r.get("speed")
            sp = (f"{s['speedup']:.3f}× ({s['plain_tokens_per_s']:.1f} → {s['policy_tokens_per_s']:.1f} tok/s)" if s else "–")
            top1 = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "–"
            ml = f"{r['mean_layers_used']:.2f} / {r['n_layers']}" if "mean_layers_used" in r else "–"
            rate = f"{r['early_exit_rate']:.2f}" if "early_exit_rate" in r else "–"
            every = f"{r['min_layer']}, every {r['check_every']}" if r["check_every"] > 1 else f"{r['min_layer']} onward"
            lines.append(f"| {r['criterion']} | {every} | {r['threshold']} | {top1} | {ml} | {rate} | {sp} |")
        parts.append("\n".join(lines))
    for f in sorted(out.glob("speculative-skip*.json")):
        d = json.loads(f.read_text())
        lines = [f"**Speculative decoding** (greedy; {d['prompts']} WikiText-2 prompts of 128 tokens, {d['gen']} new tokens; "
                 f"self draft skips layers {d['skip_layers']} chosen by block influence; {d['threads']} threads)", "",
                 "| draft | acceptance rate | accepted / round | speedup (total) | per-prompt range | tokens = plain greedy |",
                 "|---|---|---|---|---|---|"]
        for n, r in d["rows"].items():
            lines.append(f"| {n} | {r['acceptance_rate']:.3f} | {r['mean_accepted_length']:.2f} | {r['speedup_total']:.3f}× | "
                         f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f} | {r['matches_plain']} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["streaming", "passkey", "early-exit", "speculative", "table"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--rows", default="full,sinks,window,sinks-original",
                    help="comma list of: full, sinks, window, sinks-original, window-original, h2o, recompute")
    ap.add_argument("--recompute-stride", type=int, default=16, help="recompute row: tokens scored per forward")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--speed-at", default="", help="extra early-exit thresholds to time")
    ap.add_argument("--criterion", choices=["softmax", "state"], default="softmax")
    ap.add_argument("--min-layer", type=int, default=None, help="early-exit: first layer checked (default half the depth)")
    ap.add_argument("--check-every", type=int, default=1)
    ap.add_argument("--part", choices=["fidelity", "speed", "both"], default="both",
                    help="early-exit: fidelity sweep, speed (reuses the saved sweep), or both")
    ap.add_argument("--fidelity-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-fraction", type=float, default=0.5)
    ap.add_argument("--drafts", default="self,prompt_lookup", help="speculative: comma list of self, prompt_lookup")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench-decoding")
    ap.add_argument("--write", default=None, help="markdown file to update (section decoding-<model>)")
    a = ap.parse_args()
    if a.phase == "table":
        body = _table(a)
        print(body)
        if a.write:
            cmd = "python benchmarks/decoding.py --phase table --write " + a.write
            write_section(a.write, f"decoding-{a.model}", f"Command: `{cmd}` (after the measuring phases)\n\n{body}")
        return 0
    {"streaming": _streaming, "passkey": _passkey, "early-exit": _early_exit, "speculative": _speculative}[a.phase](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
