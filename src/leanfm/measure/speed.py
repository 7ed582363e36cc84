"""Prefill and decode timing with the KV cache (greedy), after warm-up, over repeats.

One repeat: a prefill forward over ``[batch, prompt]`` ids (timed as ``prefill_ms``; it yields
the first new token, the LM head computed for the last position only, as ``generate`` does), then ``gen`` single-token decode steps, each timed (time per output token).
The cache holds ``prompt + gen`` positions at the end (fewer under an evicting KV-cache policy
attached to the model, whose cache is used from the prefill on). Reported: medians over the recorded
repeats and the spread (min/max), so a noisy machine shows up in the numbers.
"""
from __future__ import annotations

import statistics
import time

import torch

from .. import progress


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@torch.no_grad()
def _one_repeat(model, prompt_ids: torch.Tensor, gen: int):
    _sync()
    t0 = time.perf_counter()
    kw = {}
    if getattr(model, "leanfm_kv_policy", None) is not None:  # a KV-cache policy (StreamingLLM, H2O, ...)
        from ..methods.kvcache.policies import make_cache

        kw["past_key_values"] = make_cache(model)
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **kw)  # LM head on the last position, as generate
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync()
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    steps = []
    for _ in range(gen):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        steps.append(time.perf_counter() - t0)
        cache = out.past_key_values
    return prefill, steps, cache


def decode_benchmark(model, prompt_ids: torch.Tensor, gen: int, repeats: int, warmup: int, on_timed=None) -> dict:
    """Time prefill + ``gen`` decode steps. ``on_timed(seconds, tokens)`` sees each recorded repeat."""
    batch = prompt_ids.shape[0]
    prefills, tps, all_steps, cache = [], [], [], None
    with progress.bar("speed (prefill + decode)", warmup + repeats) as adv:
        for r in range(warmup + repeats):
            prefill, steps, cache = _one_repeat(model, prompt_ids, gen)
            adv()
            if r < warmup:
                continue
            prefills.append(prefill * 1e3)
            all_steps.extend(s * 1e3 for s in steps)
            tps.append(batch * gen / sum(steps))
            if on_timed:
                on_timed(sum(steps), batch * gen)
    return {
        "metrics": {
            "prefill_ms": statistics.median(prefills),
            "tpot_ms_p50": _percentile(all_steps, 0.5),
            "tpot_ms_p90": _percentile(all_steps, 0.9),
            "decode_tokens_per_s": statistics.median(tps),
        },
        "details": {
            "prefill_ms_min": min(prefills), "prefill_ms_max": max(prefills),
            "decode_tokens_per_s_min": min(tps), "decode_tokens_per_s_max": max(tps),
            "decode_tokens_per_s_repeats": [round(x, 3) for x in tps],
            "decode_seconds_total": sum(all_steps) / 1e3, "decode_tokens_total": batch * gen * repeats,
        },
        "cache": cache,
    }
