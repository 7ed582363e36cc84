"""Speculative decoding loop (batch 1) and the plain greedy / sampling loop it is compared with.

Each round: the draft proposes ``m <= k`` tokens; one target forward scores the last committed
token plus the ``m`` proposals (``m + 1`` positions, the prompt too on the first round); the
verification rule (:mod:`.speculative_math`) keeps ``n`` proposals and appends one target token.
Both caches roll back to the committed text at their next ``sync`` (``DynamicCache.crop``).

Stats returned with the tokens:
``rounds`` (target verification forwards), ``proposed`` / ``accepted`` draft tokens,
``acceptance_rate`` = accepted / proposed, ``mean_accepted_length`` = accepted draft tokens per
round (0..k), ``tokens_per_round`` = new tokens per target forward (``mean_accepted_length``
+ 1 except at the end), ``target_forward_calls`` and ``draft_forward_calls``.
"""
from __future__ import annotations

import torch

from ...errors import LeanfmError
from .drafts import Drafter, as_drafter
from .speculative_math import probs_from_logits, verify_greedy, verify_sampling
from .steppers import as_stepper, prompt_list


def check_sampling(temperature: float, top_k: int | None) -> None:
    if temperature < 0:
        raise LeanfmError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise LeanfmError(f"top_k={top_k} must be >= 1")


def _finish(tokens: list[int], n_prompt: int, eos_token_id: int | None) -> bool:
    return eos_token_id is not None and eos_token_id in tokens[n_prompt:]


def _to_tensor(tokens: list[int], max_len: int, eos_token_id: int | None, n_prompt: int) -> torch.Tensor:
    tokens = tokens[:max_len]
    if eos_token_id is not None and eos_token_id in tokens[n_prompt:]:
        tokens = tokens[: tokens.index(eos_token_id, n_prompt) + 1]
    return torch.tensor([tokens], dtype=torch.long)


@torch.no_grad()
def plain_generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, generator: torch.Generator | None = None,
                   eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Reference decoding, one cached forward per token. Returns ``([1, P + G] ids, stats)``."""
    check_sampling(temperature, top_k)
    step = as_stepper(model)
    step.reset()
    tokens = prompt_list(input_ids)
    n_prompt = len(tokens)
    while len(tokens) - n_prompt < max_new_tokens and not _finish(tokens, n_prompt, eos_token_id):
        logits = step.sync(tokens)[-1]
        if temperature == 0:
            tokens.append(int(logits.argmax()))
        else:
            p = probs_from_logits(logits, temperature, top_k)
            tokens.append(int(torch.multinomial(p, 1, generator=generator).item()))
    out = _to_tensor(tokens, n_prompt + max_new_tokens, eos_token_id, n_prompt)
    return out, {"policy": "plain", "target_forward_calls": step.calls, "new_tokens": out.shape[1] - n_prompt}


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None,
                         generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Speculative decoding of ``target`` with ``draft`` (a model, a Stepper or a :class:`Drafter`).

    ``temperature == 0``: greedy, token-identical to :func:`plain_generate` (up to float
    differences between scoring several positions at once and one at a time).
    ``temperature > 0``: speculative sampling; each token is distributed as the target's
    temperature / top-k distribution. Returns ``([1, P + G] ids, stats)`` (module docstring).
    """
    if k < 1:
        raise LeanfmError(f"k={k} must be >= 1 (draft tokens per round)")
    check_sampling(temperature, top_k)
    tstep = as_stepper(target)
    drafter: Drafter = as_drafter(draft)
    if drafter.vocab_size is not None and drafter.vocab_size != tstep.vocab_size:
        raise LeanfmError(f"draft scores {drafter.vocab_size} tokens but the target scores {tstep.vocab_size}: "
                          "speculative decoding needs a draft with the target's tokenizer")
    for s in (tstep, getattr(drafter, "stepper", None)):
        if s is not None:  # rollbacks remove at most k positions (sliding-window caches keep them)
            s.max_rollback = max(s.max_rollback, k + 1)
    tstep.reset()
    drafter.reset()
    tokens = prompt_list(input_ids)
    n_prompt = len(tokens)
    rounds = proposed = accepted = 0
    while len(tokens) - n_prompt < max_new_tokens and not _finish(tokens, n_prompt, eos_token_id):
        budget = max_new_tokens - (len(tokens) - n_prompt)
        kk = min(k, budget - 1)  # a round emits at most kk + 1 tokens: never draft past the budget
        drafts, q = drafter.propose(tokens, kk, temperature, top_k, generator) if kk > 0 else ([], None)
        logits = tstep.sync(tokens + drafts, last=len(drafts) + 1)
        if temperature == 0:
            n, nxt = verify_greedy(drafts, logits)
        else:
            n, nxt = verify_sampling(drafts, q, probs_from_logits(logits, temperature, top_k), generator)
        tokens = tokens + drafts[:n] + [nxt]
        rounds += 1
        proposed += len(drafts)
        accepted += n
    out = _to_tensor(tokens, n_prompt + max_new_tokens, eos_token_id, n_prompt)
    return out, {
        "policy": "speculative",
        "draft": drafter.name,
        "k": k,
        "new_tokens": out.shape[1] - n_prompt,
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": accepted / rounds if rounds else 0.0,
        "tokens_per_round": (out.shape[1] - n_prompt) / rounds if rounds else 0.0,
        "target_forward_calls": tstep.calls,
        "draft_forward_calls": drafter.calls,
    }
