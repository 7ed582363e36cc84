"""Incremental language-model runners ("steppers") with a rollback-able KV cache.

A :class:`Stepper` remembers which tokens its state (KV cache) holds. ``sync(tokens)`` brings it
to the sequence ``tokens``: it drops cached positions beyond the longest common prefix (the
rejected draft tokens of speculative decoding) and feeds the rest, returning their logits. The
decoding loops only ever call ``sync``, so a test stub implements two methods (``_feed`` and
``_crop``) and exercises exactly the bookkeeping the real model uses.

:class:`ModelStepper` runs a Hugging Face causal LM with a ``DynamicCache`` (rollback with
``DynamicCache.crop``; sliding-window layers record their past so that they can be cropped).
With ``skip`` it is the *layer-skip view* of self-speculative decoding (Zhang et al., 2023,
"Draft & Verify"; Elhoushi et al., 2024, "LayerSkip"): the listed decoder layers act as the
identity, the weights are the model's own, and the view has its own cache in which the skipped
layers hold no entries (transformers' ``DummyLayer``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...errors import LeanfmError
from ..layers import decoder_layers


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    return next(i for i in range(m) if a[i] != b[i])


class Stepper:
    """Base: cached-token bookkeeping. Subclasses implement ``_reset``, ``_feed`` and ``_crop``."""

    vocab_size: int
    max_rollback = 0  # most positions a later rollback may remove (set by the speculative loop)

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.calls = 0  # forward passes run (one per ``_feed``)

    def reset(self) -> None:
        """Empty the state and the counters (start of a generation)."""
        self.tokens, self.calls = [], 0
        self._reset()

    def sync(self, tokens: list[int], last: int = 1) -> torch.Tensor:
        """Make the state hold ``tokens``; return the logits ``[last, V]`` of the last ``last`` positions.

        The last token is always (re)fed, so at least one position is run. Asking for more
        positions than are fed is an error (the caller keeps its own logits for older ones)."""
        if not tokens:
            raise LeanfmError("cannot run a language model on an empty sequence")
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        self._crop(keep)
        self.tokens = self.tokens[:keep]
        new = tokens[keep:]
        if not 1 <= last <= len(new):
            raise ValueError(f"asked for the logits of {last} positions but only {len(new)} are fed")
        logits = self._feed(new, keep, last)
        self.tokens = self.tokens + list(new)
        self.calls += 1
        return logits

    # subclass interface --------------------------------------------------------------------
    def _reset(self) -> None:
        raise NotImplementedError

    def _feed(self, new: list[int], start: int, last: int) -> torch.Tensor:
        """Run positions ``start .. start+len(new)-1``; return the logits of the last ``last``: ``[last, V]``."""
        raise NotImplementedError

    def _crop(self, keep: int) -> None:
        """Drop cached positions ``>= keep``; also called with ``keep == len(tokens)`` (no-op)."""
        raise NotImplementedError


def _identity_forward(hidden_states, *args, **kwargs):
    # transformers 5 decoder layers take the hidden states first and return them as a tensor
    return hidden_states


@contextlib.contextmanager
def patched_forwards(modules, forwards: dict[int, object]):
    """Temporarily replace ``modules[i].forward`` (an instance attribute) for each ``i`` in ``forwards``.

    Decoder layers stay in place, so per-layer tables indexed by position (Gemma3's
    ``layer_types``) and each attention's ``layer_idx`` keep meaning what they meant."""
    saved = {i: modules[i].__dict__.get("forward") for i in forwards}
    for i, fn in forwards.items():
        modules[i].forward = fn
    try:
        yield
    finally:
        for i, old in saved.items():
            if old is None:
                del modules[i].forward
            else:
                modules[i].forward = old


def prompt_list(input_ids: torch.Tensor) -> list[int]:
    """Token ids ``[1, P]`` (or ``[P]``) as a list; one-line error for batches or empty prompts."""
    if not isinstance(input_ids, torch.Tensor):
        raise LeanfmError(f"input_ids must be a LongTensor [1, P], got {type(input_ids).__name__}")
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise LeanfmError(f"speculative decoding and early exit decode one sequence at a time; got a batch of {input_ids.shape[0]}")
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise LeanfmError("input_ids must be a non-empty [1, P] tensor of token ids")
    return [int(t) for t in input_ids.tolist()]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def logits_width(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_skip(n_layers: int, skip) -> list[int]:
    """Validated, sorted list of layer indices to skip (one-line errors)."""
    skip = sorted(set(int(i) for i in skip))
    bad = [i for i in skip if not 0 <= i < n_layers]
    if bad:
        raise LeanfmError(f"skip_layers {bad} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    if len(skip) >= n_layers:
        raise LeanfmError(f"skipping all {n_layers} decoder layers leaves no draft model; skip fewer layers")
    return skip


def new_cache(model: nn.Module, skip: list[int] = (), record_past: bool = False):
    """A ``DynamicCache`` for ``model``; skipped layers get a ``DummyLayer`` (no entries).

    ``record_past``: sliding-window layers keep positions older than the window until the next
    ``crop``, so that a rollback of rejected tokens can restore the window."""
    from transformers import DynamicCache
    from transformers.cache_utils import DummyLayer

    cache = DynamicCache(config=model.config)
    if skip and len(cache.layers) <= max(skip):
        raise LeanfmError("this model's cache layout is not supported by the layer-skip draft")
    for i in skip:
        cache.layers[i] = DummyLayer()
    if record_past:
        cache.activate_past_recording()
    return cache


def trim_sliding(cache, extra: int) -> None:
    """Bound sliding-window layers that record their past to ``window - 1 + extra`` positions.

    ``DynamicSlidingWindowLayer`` returns (and masks) only the last ``window - 1 + q`` positions
    and ``crop(-r)`` needs ``window - 1 + r`` stored ones, so keeping ``extra`` >= the largest
    later rollback is exact; ``cumulative_length`` (positions seen) is unchanged."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None:
            n = layer.sliding_window - 1 + extra
            if layer.keys.shape[-2] > n:
                layer.keys, layer.values = layer.keys[..., -n:, :], layer.values[..., -n:, :]


class ModelStepper(Stepper):
    """A causal LM (batch 1) with a ``DynamicCache``; ``skip`` makes it a layer-skip draft view."""

    def __init__(self, model: nn.Module, skip=()) -> None:
        super().__init__()
        self.model = model
        self.layers = decoder_layers(model)
        self.skip = check_skip(len(self.layers), skip) if skip else []
        self.vocab_size = logits_width(model)
        self.device = model_device(model)
        self.cache = None

    def _reset(self) -> None:
        self.cache = new_cache(self.model, self.skip, record_past=self.max_rollback > 0)

    def _crop(self, keep: int) -> None:
        if self.cache is None:
            self._reset()
        if not self.tokens:  # empty cache: its layers are not initialized yet, nothing to crop
            return
        remove = len(self.tokens) - keep
        if remove:
            # DynamicCache.crop: every layer drops its last `remove` positions; sliding-window
            # layers then also shrink back to the window (only committed text is left)
            self.cache.crop(-remove)
        elif self.max_rollback:
            trim_sliding(self.cache, self.max_rollback)

    @torch.no_grad()
    def _feed(self, new: list[int], start: int, last: int) -> torch.Tensor:
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(new), device=self.device).unsqueeze(0)
        with patched_forwards(self.layers, {i: _identity_forward for i in self.skip}):
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=last)
        return out.logits[0, -last:].float()


def skip_view(model: nn.Module, skip: list[int]) -> nn.Module:
    """A shallow copy of ``model`` whose decoder runs only the layers not in ``skip``: the same
    modules and weights, a config saying how many layers it runs (per-layer config lists cut to
    match). Each attention keeps its ``layer_idx``, so the view writes the full model's cache
    layout (a cache made from the full config; skipped layers stay empty). For the compiled draft
    of self-speculative decoding, where patching forwards at run time cannot be traced."""
    import copy

    layers = decoder_layers(model)
    path = next((n for n, m in model.named_modules() if m is layers), None)
    if not path:
        raise LeanfmError("could not locate the decoder layer stack to build a layer-skip view")
    keep = [i for i in range(len(layers)) if i not in set(skip)]
    cfg = copy.copy(model.config)
    for key, value in list(vars(cfg).items()):
        if not key.startswith("_") and isinstance(value, (list, tuple)) and len(value) == len(layers):
            setattr(cfg, key, type(value)(value[i] for i in keep))
    cfg.num_hidden_layers = len(keep)

    def clone(mod: nn.Module) -> nn.Module:
        c = copy.copy(mod)
        c._modules = dict(mod._modules)  # own child table: replacing a child leaves the model alone
        if getattr(mod, "config", None) is model.config:
            c.config = cfg
        return c

    view = clone(model)
    parent = view
    *heads, last = path.split(".")
    for name in heads:
        child = clone(parent._modules[name])
        parent._modules[name] = child
        parent = child
    parent._modules[last] = nn.ModuleList([layers[i] for i in keep])
    return view


class StaticStepper(Stepper):
    """A causal LM (batch 1) on a static KV cache of ``max_len`` positions with a compiled step
    (:class:`leanfm.models.compiled.StaticDecoder`); ``skip`` makes it a layer-skip draft view.
    Feeding from position 0 (the prompt) runs eagerly; every later feed runs the graph compiled
    for its length. Rollback moves the cache's write position back (stale positions are masked)."""

    def __init__(self, model: nn.Module, max_len: int, skip=(), compile: bool = True) -> None:
        from ...models.compiled import StaticDecoder

        super().__init__()
        self.skip = check_skip(len(decoder_layers(model)), skip) if skip else []
        run = skip_view(model, self.skip) if self.skip else model
        self.vocab_size = logits_width(model)
        self.device = model_device(model)
        self.dec = StaticDecoder(run, max_len, compile=compile, cache_config=model.config)

    def _reset(self) -> None:
        self.dec.reset()

    def _crop(self, keep: int) -> None:
        self.dec.crop(min(keep, self.dec.pos))

    def _feed(self, new: list[int], start: int, last: int) -> torch.Tensor:
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        logits = self.dec.prefill(ids, last) if start == 0 else self.dec.step(ids)
        return logits[0, -last:].float()


def as_stepper(model_or_stepper) -> Stepper:
    """Wrap an ``nn.Module`` causal LM into a :class:`ModelStepper`; pass a :class:`Stepper` through."""
    if isinstance(model_or_stepper, Stepper):
        return model_or_stepper
    if isinstance(model_or_stepper, nn.Module):
        return ModelStepper(model_or_stepper)
    raise LeanfmError(f"expected a causal LM (nn.Module) or a Stepper, got {type(model_or_stepper).__name__}")
