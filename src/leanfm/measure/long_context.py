"""Long-context evaluation with a bounded KV cache: streaming perplexity and passkey retrieval.

``stream_perplexity`` decodes one long token stream through a single cache, ``chunk`` tokens per
forward, so every prediction sees only what the policy kept (StreamingLLM's protocol, Sec. 4.1);
``kv_cache_bytes`` is the largest ``tensor_bytes(cache)`` observed after a forward (the transient
peak inside a forward additionally holds the ``chunk`` new tokens).

``passkey_accuracy`` hides a random 5-digit passkey at a random depth in repetitive filler text
(the synthetic retrieval test of Mohtashami & Jaggi 2023), feeds the prompt through the cache and
greedily decodes the answer; a trial counts when the 5 digits appear in the decoded text.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanfmError
from ..methods.kvcache.policies import make_cache
from .memory import tensor_bytes


def _factory(model: nn.Module, policy) -> Callable[[], object]:
    """None -> the model's policy (or full cache); a config -> its cache; a callable -> itself."""
    if policy is None:
        return lambda: make_cache(model)
    if hasattr(policy, "make_cache"):
        policy.validate()
        return lambda: policy.make_cache(model)
    if callable(policy):
        return policy
    raise LeanfmError(f"policy must be None, a KV policy config or a cache factory, got {type(policy).__name__}")


@torch.no_grad()
def stream_perplexity(model: nn.Module, ids: torch.Tensor, cache_factory=None, chunk: int = 1) -> dict:
    """Perplexity of ``ids`` (1-D token ids) decoded as one stream through a bounded cache.

    ``cache_factory``: zero-argument callable returning a fresh Cache, a KV policy config, or None
    (the model's attached policy, else a full ``DynamicCache``). Every token after the first is
    scored once; prepend BOS to ``ids`` yourself where the model needs it (Gemma). Returns perplexity, nll_per_token, eval_tokens and kv_cache_bytes (max).
    """
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise LeanfmError(f"stream_perplexity needs at least 2 tokens, got {ids.numel()}")
    if chunk < 1:
        raise LeanfmError(f"chunk={chunk} must be a positive number of tokens")
    cache = _factory(model, cache_factory)()
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll, count, peak = 0.0, 0, 0
    for start in range(0, ids.numel() - 1, chunk):
        inp = ids[start: min(start + chunk, ids.numel() - 1)]
        target = ids[start + 1: start + 1 + inp.numel()]
        logits = model(input_ids=inp[None], past_key_values=cache, use_cache=True).logits[0].float()
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        peak = max(peak, tensor_bytes(cache))
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "eval_tokens": count, "kv_cache_bytes": peak}


@torch.no_grad()
def sliding_window_perplexity(model: nn.Module, ids: torch.Tensor, window: int, stride: int = 1) -> dict:
    """Perplexity of ``ids`` where every token is predicted from at most the ``window`` tokens
    before it, recomputed from scratch (StreamingLLM's "sliding window with re-computation"
    baseline, Xiao et al. 2024 Fig. 3: the best a ``window``-token context can do, at O(window^2)
    cost per token). ``stride`` > 1 scores ``stride`` tokens per forward, so their contexts span
    ``window - stride + 1 .. window`` tokens (an approximation, slightly less context than exact).
    """
    ids = ids.reshape(-1)
    if not 1 <= stride <= window:
        raise LeanfmError(f"stride={stride} must be in [1, window={window}]")
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll, count = 0.0, 0
    # first forward: the opening tokens (each sees all before it, fewer than window)
    first = min(window, ids.numel() - 1)
    logits = model(input_ids=ids[None, :first]).logits[0].float()
    nll += F.cross_entropy(logits, ids[1: first + 1], reduction="sum").item()
    count += first
    for end in range(first + stride, ids.numel() - 1 + stride, stride):  # predict targets end-stride+1 .. end
        end = min(end, ids.numel() - 1)
        lo = count + 1  # first target not yet scored
        inp = ids[max(0, end - window): end]
        logits = model(input_ids=inp[None]).logits[0, -(end + 1 - lo):].float()
        nll += F.cross_entropy(logits, ids[lo: end + 1], reduction="sum").item()
        count += end + 1 - lo
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "eval_tokens": count}


_INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and remember it."
_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens: int, key: str, depth: float, bos: bool) -> torch.Tensor:
    """Token ids of about ``n_tokens`` (never fewer than intro + needle + question): the needle
    with ``key`` sits after a ``depth`` share (0..1) of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + enc(_INTRO)
    needle, question, filler = enc(_NEEDLE.format(key=key)), enc(_QUESTION), enc(_FILLER)
    room = max(0, n_tokens - len(head) - len(needle) - len(question))
    fill = (filler * (room // len(filler) + 1))[:room]
    cut = int(round(depth * room))
    return torch.tensor(head + fill[:cut] + needle + fill[cut:] + question, dtype=torch.long)


@torch.no_grad()
def _greedy(model, prompt: torch.Tensor, cache, new_tokens: int, prefill_chunk: int | None) -> list[int]:
    step = prompt.numel() if prefill_chunk is None else prefill_chunk
    for start in range(0, prompt.numel(), step):
        logits = model(input_ids=prompt[None, start: start + step], past_key_values=cache, use_cache=True).logits
    out = []
    for _ in range(new_tokens):
        nxt = logits[0, -1].argmax()
        out.append(int(nxt))
        logits = model(input_ids=nxt.view(1, 1), past_key_values=cache, use_cache=True).logits
    return out


def passkey_accuracy(model: nn.Module, tokenizer, policy=None, context_lengths=(1024, 2048, 4096), trials: int = 5,
                     seed: int = 0, prefill_chunk: int | None = 256, new_tokens: int = 8) -> dict:
    """Share of trials whose greedy answer contains the passkey, per context length (in tokens).

    policy: None (the model's attached policy, else full cache), a KV policy config, or a
    zero-argument cache factory. prefill_chunk: prompt tokens per forward; None feeds the whole
    prompt at once (then every prompt token attends to the full prompt before any eviction,
    SnapKV's setting, and a bounded policy is only bounded during decoding).
    Returns ``{"accuracy": {length: share}, "trials": trials, "prompt_tokens": {length: n}}``.
    """
    from ..models.family import needs_bos

    if trials < 1:
        raise LeanfmError(f"trials={trials} must be at least 1")
    make = _factory(model, policy)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    acc, sizes = {}, {}
    for length in context_lengths:
        hits = 0
        for _ in range(trials):
            key = f"{rng.randint(10000, 99999)}"
            prompt = passkey_prompt(tokenizer, int(length), key, rng.random(), needs_bos(model)).to(device)
            sizes[int(length)] = prompt.numel()
            answer = tokenizer.decode(_greedy(model, prompt, make(), new_tokens, prefill_chunk))
            hits += key in answer
        acc[int(length)] = hits / trials
    return {"accuracy": acc, "trials": trials, "prompt_tokens": sizes}
