"""The verification rules of speculative decoding, as pure functions on logits / probabilities.

Notation (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al., 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"):
a draft proposes tokens ``x_1..x_m`` with draft distributions ``q_1..q_m``; one target forward
over the context plus those tokens gives ``p_1..p_{m+1}`` (``p_i`` predicts the position of
``x_i``; ``p_{m+1}`` the position after the last draft token).

* Greedy: accept the longest prefix with ``x_i == argmax p_i``; the next token is
  ``argmax p_{n+1}`` (the correction on a mismatch, the bonus after full acceptance). The output
  equals plain greedy decoding token for token, whatever the draft proposes.
* Sampling (Leviathan et al. Algorithm 1 / Chen et al. Algorithm 2): accept ``x_i`` with
  probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection sample from the residual
  ``norm(max(0, p_i - q_i))`` and stop; when all are accepted sample a bonus token from
  ``p_{m+1}``. Each emitted token is then distributed exactly as ``p`` (Leviathan et al.
  Theorem 3.5 / Appendix A.1).

Temperature and top-k are applied by :func:`probs_from_logits` to both ``p`` and ``q`` in the same
way, so the guarantee is with respect to the *processed* target distribution, i.e. what plain
sampling with the same temperature / top-k would draw from.
"""
from __future__ import annotations

import torch


def probs_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Sampling distribution over the last dim: ``softmax(logits / T)`` restricted to the top-k.

    ``temperature`` must be > 0 (greedy decoding does not need probabilities). Ties at the k-th
    value are all kept (a threshold on values, not a sort order), so the result does not depend
    on how a sort breaks ties.
    """
    x = logits.float() / float(temperature)
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.softmax(x, dim=-1)


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification. ``target_logits``: ``[m + 1, V]`` for ``m = len(draft_tokens)``.

    Returns ``(n_accepted, next_token)``: the first ``n_accepted`` draft tokens are kept and
    ``next_token`` (the target's argmax after them) is appended.
    """
    m = len(draft_tokens)
    if target_logits.shape[0] != m + 1:
        raise ValueError(f"need {m + 1} target positions for {m} draft tokens, got {target_logits.shape[0]}")
    best = target_logits.argmax(dim=-1).tolist()
    n = 0
    while n < m and draft_tokens[n] == best[n]:
        n += 1
    return n, int(best[n])


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))`` (Leviathan et al. §2.3, eq. for p'(x)); ``p`` itself if p == q."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    if not bool(total > 0):  # p <= q everywhere means p == q: rejection then has probability 0
        return p
    return r / total


def verify_sampling(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling (modified rejection sampling).

    ``draft_probs``: ``[m, V]`` distributions the draft tokens were sampled from, or ``None`` when
    the draft is deterministic (e.g. prompt lookup): ``q_i`` is then a point mass on ``x_i``.
    ``target_probs``: ``[m + 1, V]``. Returns ``(n_accepted, next_token)`` as :func:`verify_greedy`.
    """
    m = len(draft_tokens)
    if target_probs.shape[0] != m + 1:
        raise ValueError(f"need {m + 1} target positions for {m} draft tokens, got {target_probs.shape[0]}")
    if m:
        u = torch.rand(m, generator=generator, dtype=torch.float64).tolist()
    for i, x in enumerate(draft_tokens):
        p = target_probs[i]
        px = float(p[x])
        qx = 1.0 if draft_probs is None else float(draft_probs[i, x])
        # accept with probability min(1, p(x)/q(x)): u < p/q  <=>  u*q < p  (q(x) > 0: x was drawn from q)
        if u[i] * qx < px:
            continue
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[x] = 1.0
        else:
            q = draft_probs[i]
        return i, _sample(residual_distribution(p, q), generator)
    return m, _sample(target_probs[m], generator)
