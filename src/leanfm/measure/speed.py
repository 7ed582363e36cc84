"""Prefill and decode timing with the KV cache (greedy), after warm-up, over repeats.

One repeat: a prefill forward over ``[batch, prompt]`` ids (timed as ``prefill_ms``; it yields
the first new token, the LM head computed for the last position only, as ``generate`` does), then ``gen`` single-token decode steps, each timed (time per output token).
The cache holds ``prompt + gen`` positions at the end (fewer under an evicting KV-cache policy
attached to the model, whose cache is used from the prefill on). Reported: medians over the recorded
repeats and the spread (min/max), so a noisy machine shows up in the numbers.

With a decoding policy attached (``model.leanfm_decoder``: speculative, prompt lookup, early
exit), the decode part of each repeat runs *through the policy* (:func:`..decoding.policy_repeat`):
decode time = the policy's whole generation minus the repeat's prefill; time per output token is
that over the tokens it emitted (a policy emits several per forward, so ``tpot_ms_p50/p90`` are
over the repeats' means, not single steps); the policy's own metrics (``acceptance_rate``,
``mean_accepted_tokens``, ``mean_layers_used``, ...) come with them. ``kv_cache_bytes`` is then the
target model's cache after one untimed plain decode of the same length.
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


def _policy_benchmark(model, policy, prompt_ids: torch.Tensor, gen: int, repeats: int, warmup: int, on_timed) -> dict:
    from .decoding import check_policy_batch, policy_repeat

    check_policy_batch(policy, prompt_ids.shape[0])
    prefills, tps, tpots, decodes, stats = [], [], [], [], []
    with progress.bar(f"speed (prefill + decode through {policy.name})", warmup + repeats + 1) as adv:
        for r in range(warmup + repeats):
            prefill, decode_s, new, st = policy_repeat(model, policy, prompt_ids, gen, seed=r)
            adv()
            if r < warmup:
                continue
            prefills.append(prefill * 1e3)
            tps.append(new / decode_s)
            tpots.append(decode_s * 1e3 / new)
            decodes.append(decode_s)
            stats.append(st)
            if on_timed:
                on_timed(decode_s, new)
        cache = _one_repeat(model, prompt_ids, gen)[2]  # untimed: the target's cache at P + G
        adv()
    return {
        "metrics": {
            "prefill_ms": statistics.median(prefills),
            "tpot_ms_p50": _percentile(tpots, 0.5),
            "tpot_ms_p90": _percentile(tpots, 0.9),
            "decode_tokens_per_s": statistics.median(tps),
            **policy.metrics(stats),
        },
        "details": {
            "prefill_ms_min": min(prefills), "prefill_ms_max": max(prefills),
            "decode_tokens_per_s_min": min(tps), "decode_tokens_per_s_max": max(tps),
            "decode_tokens_per_s_repeats": [round(x, 3) for x in tps],
            "decode_seconds_total": sum(decodes),
            "decode_tokens_total": sum(s["new_tokens"] for s in stats),
            "decoding_policy": policy.name, "decoding_policy_stats": stats,
            "tpot_scope": "per-repeat mean (the policy emits several tokens per forward)",
        },
        "cache": cache,
    }


def decode_benchmark(model, prompt_ids: torch.Tensor, gen: int, repeats: int, warmup: int, on_timed=None) -> dict:
    """Time prefill + ``gen`` decode steps (through the model's decoding policy when one is
    attached). ``on_timed(seconds, tokens)`` sees each recorded repeat."""
    policy = getattr(model, "leanfm_decoder", None)
    if policy is not None:
        return _policy_benchmark(model, policy, prompt_ids, gen, repeats, warmup, on_timed)
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
