"""Timing decoding policies (speculative, prompt lookup, early exit): against plain greedy in the
same process (:func:`measure_speedup`, what ``benchmarks/decoding.py`` reports), and as the
decode measurement of ``leanfm bench`` when a recipe attaches a policy (:func:`policy_repeat`).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..errors import LeanfmError
from ..methods.decoding.policy import generate_with_policy
from ..methods.decoding.speculative import plain_generate
from ..methods.decoding.steppers import model_device
from .speed import sync_device


def _timed(fn):
    sync_device()
    t0 = time.perf_counter()
    out = fn()
    sync_device()
    return time.perf_counter() - t0, out


def check_policy_batch(policy, batch: int) -> None:
    if batch != 1:
        raise LeanfmError(f"the decoding policy {policy.name} decodes one sequence at a time; measure it with --batch 1")


@torch.no_grad()
def policy_repeat(model: nn.Module, policy, prompt_ids: torch.Tensor, gen: int, seed: int,
                  generate=None) -> tuple[float, float, int, dict]:
    """One repeat under a decoding policy: the prefill forward timed alone (as for plain decoding),
    then the policy's whole generation (its own prefill included) timed end to end; ``generate``:
    the policy's compiled generation (``policy.compiled``) instead of its eager one.

    Returns ``(prefill_s, decode_s, new_tokens, stats)`` with ``decode_s`` = generation time minus
    this repeat's prefill time: the time after the prompt, as plain decoding's ``decode`` steps."""
    prefill, _ = _timed(lambda: model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1))
    gen_rng = torch.Generator(model_device(model)).manual_seed(seed)
    run = generate if generate is not None else (lambda ids, n, generator: policy.generate(model, ids, n, generator=generator))
    total, (out, stats) = _timed(lambda: run(prompt_ids, gen, generator=gen_rng))
    new = out.shape[1] - prompt_ids.shape[1]
    return prefill, max(total - prefill, 1e-9), new, stats


def measure_speedup(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, repeats: int = 3,
                    warmup: int = 1, policy=None) -> dict:
    """Wall-clock of plain greedy vs the policy on the same prompt, alternating runs, medians.

    ``speedup`` = plain seconds / policy seconds (end to end: prefill + ``max_new_tokens``).
    ``matches_plain``: whether the policy's tokens equal plain greedy's (expected for greedy
    speculative decoding; early exit trades this for speed)."""
    plain_s, pol_s = [], []
    for r in range(warmup + repeats):
        tp, (ref, _) = _timed(lambda: plain_generate(model, input_ids, max_new_tokens))
        tq, (out, stats) = _timed(lambda: generate_with_policy(model, input_ids, max_new_tokens, policy=policy,
                                                               generator=torch.Generator(model_device(model)).manual_seed(r)))
        if r >= warmup:
            plain_s.append(tp)
            pol_s.append(tq)
    new = out.shape[1] - input_ids.shape[1]
    p, q = statistics.median(plain_s), statistics.median(pol_s)
    return {**stats, "plain_s": p, "policy_s": q, "plain_tokens_per_s": (ref.shape[1] - input_ids.shape[1]) / p,
            "policy_tokens_per_s": new / q, "speedup": p / q, "matches_plain": bool(torch.equal(ref, out)),
            "repeats": repeats, "plain_s_all": plain_s, "policy_s_all": pol_s}
