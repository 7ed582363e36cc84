"""Decoding and KV-cache benchmark (issue 5). Phases so far:

    python benchmarks/decoding.py --phase streaming [--tokens 8192] [--budget 512] [--sinks 4]

Streaming phase: the first ``--tokens`` tokens of WikiText-2 test as one stream. Full cache:
one forward over the whole stream (the same scores as decoding it token by token with an
unbounded cache). StreamingLLM (sinks + recent window, ``--budget`` entries per layer) and
window-only (the same budget, no sinks) decode it one token at a time with the bounded cache;
each reports perplexity and the largest ``kv_cache_bytes`` seen. Writes OUT/streaming.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _streaming(a) -> None:
    import leanfm
    from leanfm.data.text import load_text
    from leanfm.methods.kvcache.long_context import stream_perplexity

    torch.set_num_threads(a.threads)
    model, tok = leanfm.load(a.model)
    ids = tok(load_text("wikitext2", "test"), return_tensors="pt").input_ids[0, : a.tokens]
    rows = {}
    for name, factory, chunk in [
        ("full cache", None, ids.numel()),
        (f"streaming_llm budget {a.budget}, sinks {a.sinks}", leanfm.StreamingLLMConfig(budget=a.budget, sinks=a.sinks), 1),
        (f"window only, budget {a.budget} (sinks 0)", leanfm.StreamingLLMConfig(budget=a.budget, sinks=0), 1),
    ]:
        t0 = time.perf_counter()
        with torch.no_grad():
            r = stream_perplexity(model, ids, factory, chunk=chunk)
        r["seconds"] = time.perf_counter() - t0
        rows[name] = r
        print(f"{name}: ppl {r['perplexity']:.3f}, kv_cache_bytes {r['kv_cache_bytes'] / 1e6:.1f} MB, {r['seconds']:.0f} s", flush=True)
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "streaming.json").write_text(json.dumps({"model": a.model, "tokens": int(ids.numel()), "threads": a.threads, "rows": rows}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["streaming"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench-decoding")
    a = ap.parse_args()
    _streaming(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
