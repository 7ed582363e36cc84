"""Draft proposers for speculative decoding.

* :class:`ModelDraft`: a smaller model with the same tokenizer (e.g. Qwen2.5-0.5B for 1.5B), or
  the target's own layer-skip view (self-speculative, :func:`self_draft`); ``k`` cached steps.
* :class:`PromptLookupDraft`: prompt-lookup decoding (Saxena, 2023): find the most recent earlier
  occurrence of the last n tokens (n = ngram_max .. ngram_min) in the prompt or generated text
  and propose the tokens that followed it. No model runs; the proposal is deterministic, so for
  sampling its ``q`` is a point mass on each proposed token.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError
from ..layers import decoder_layers
from .speculative_math import probs_from_logits
from .steppers import ModelStepper, Stepper, as_stepper, check_skip, logits_width


class Drafter:
    """Proposes up to ``k`` tokens after ``tokens``; returns ``(tokens, q)`` with ``q`` ``[m, V]`` or None."""

    name = "draft"
    vocab_size: int | None = None

    def reset(self) -> None:
        pass

    @property
    def calls(self) -> int:
        return 0

    def propose(self, tokens: list[int], k: int, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError


class ModelDraft(Drafter):
    """A draft language model (any :class:`Stepper`), sampled with the same temperature / top-k."""

    def __init__(self, stepper: Stepper, name: str = "model") -> None:
        self.stepper, self.name = stepper, name
        self.vocab_size = stepper.vocab_size

    def reset(self) -> None:
        self.stepper.reset()

    @property
    def calls(self) -> int:
        return self.stepper.calls

    def propose(self, tokens, k, temperature, top_k, generator):
        seq, out, qs = list(tokens), [], []
        for _ in range(k):
            logits = self.stepper.sync(seq)[-1]
            if temperature == 0:
                x = int(logits.argmax())
            else:
                q = probs_from_logits(logits, temperature, top_k)
                x = int(torch.multinomial(q, 1, generator=generator).item())
                qs.append(q)
            out.append(x)
            seq.append(x)
        return out, (torch.stack(qs) if qs else None)


class PromptLookupDraft(Drafter):
    """Prompt-lookup decoding: n-gram match in the text so far proposes the next ``k`` tokens."""

    name = "prompt_lookup"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise LeanfmError(f"prompt lookup needs 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, tokens, k, temperature=0.0, top_k=None, generator=None):
        return lookup_continuation(tokens, k, self.ngram_max, self.ngram_min), None


def lookup_continuation(tokens: list[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the last n tokens (longest n first).

    Among the matches of one n, the most recent one that still has ``k`` tokens after it wins,
    else the earliest (the one with the longest continuation). ``[]`` when nothing matches."""
    L = len(tokens)
    if k < 1 or L < 2:
        return []
    t = torch.tensor(tokens, dtype=torch.long)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        windows = t[:-1].unfold(0, n, 1)  # window j = t[j:j+n]; a continuation t[j+n] exists
        hits = (windows == t[-n:]).all(dim=1).nonzero().flatten().tolist()
        if hits:
            full = [j for j in hits if j + n + k <= L]
            j = full[-1] if full else hits[0]
            return tokens[j + n: j + n + k]
    return []


def check_compatible(target: nn.Module, draft: nn.Module, target_tok=None, draft_tok=None) -> None:
    """One-line error unless the draft scores the same vocabulary as the target."""
    vt, vd = logits_width(target), logits_width(draft)
    if vt != vd:
        raise LeanfmError(f"draft model scores {vd} tokens but the target scores {vt}: speculative decoding needs a draft with the target's tokenizer")
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise LeanfmError(f"draft tokenizer ({len(draft_tok)} entries) differs from the target's ({len(target_tok)} entries): "
                          "speculative decoding needs the same tokenizer")


def skip_by_influence(model: nn.Module, calib: torch.Tensor, fraction: float) -> tuple[list[int], list[float]]:
    """The ``fraction`` of decoder layers with the lowest block influence (ShortGPT eq. 1) on ``calib``."""
    from ..structured.layerdrop import lowest_influence, measure_block_influence

    n_layers = len(decoder_layers(model))
    n = min(n_layers - 1, max(1, int(fraction * n_layers + 0.5)))
    bi = measure_block_influence(model, calib)
    return lowest_influence(bi, n), bi


def self_draft(model: nn.Module, skip: list[int]) -> ModelDraft:
    """Self-speculative draft: the model itself with decoder layers ``skip`` bypassed."""
    skip = check_skip(len(decoder_layers(model)), skip)
    return ModelDraft(ModelStepper(model, skip), name=f"self (skip {len(skip)} layers)")


def as_drafter(draft) -> Drafter:
    if isinstance(draft, Drafter):
        return draft
    return ModelDraft(as_stepper(draft))
