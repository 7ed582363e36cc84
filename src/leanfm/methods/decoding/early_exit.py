"""CALM-style dynamic early exit for greedy decoding (Schuster et al., 2022, "Confident Adaptive
Language Modeling").

Per generated token, after decoder layer ``i`` (``min_layer <= i < L-1``, every ``check_every``
layers) a confidence measure decides whether to stop:

* ``criterion="softmax"`` (CALM §3.5 "softmax response"): apply the model's final norm and the
  shared LM head (plus Gemma's logit soft-cap) to the hidden state; exit when
  ``p_top1 - p_top2 >= threshold``. The exit logits are the token's logits.
* ``criterion="state"`` (CALM "hidden-state saturation"): exit when
  ``cos(h_i, h_{i-1}) >= threshold``; no LM head until the exit.

KV of the skipped layers (CALM §3.4 / §4, "state propagation"): tokens after this one still attend
to every layer, so each skipped layer ``j > i`` gets K/V computed from the *exit* hidden state
``h_i`` copied forward: its own input norm, k/v projections (and k-norm) and rotary, exactly as
if ``h_i`` were its input. Implementation, without per-family code: layer ``j`` runs its own
forward on ``h_i`` with a cache proxy whose ``update`` stores K/V and then aborts the layer, so
attention, o_proj and MLP never run; ``q_proj`` is replaced by zeros during the copy (its output
is not needed). The exit hidden state passes through the skipped layers unchanged.

Costs (per token, decode): a full layer ~ ``4*h*h_attn + 3*h*i_mlp`` MACs; a KV copy ~
``2*h*h_kv`` MACs; **each confidence check with ``softmax`` costs one LM-head matmul**
(``h * vocab`` MACs). For SmolLM2-135M (h=576, 30 layers, vocab 49152) one check is ~8 layers of
work and reads 113 MB of fp32 head weights, so checking every layer makes decoding *slower*; use
``check_every`` / ``min_layer`` (or ``criterion="state"``) to keep checks rare.

The prompt (prefill) always runs at full depth; stats count decode steps only.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LeanfmError
from .decl import CRITERIA, check_threshold  # noqa: F401 (torch-free, shared with the config)
from .steppers import ModelStepper, patched_forwards, prompt_list


class _KVWritten(Exception):
    """Raised by the cache proxy once a skipped layer's K/V are stored (aborts that layer)."""


class _Exited(Exception):
    """Raised after the last layer's KV copy: the exit logits are already known."""


class _WriteThenStop:
    def __init__(self, cache):
        self._cache = cache

    def update(self, *args, **kwargs):
        self._cache.update(*args, **kwargs)
        raise _KVWritten

    def __getattr__(self, name):
        return getattr(self._cache, name)


def default_min_layer(n_layers: int) -> int:
    """Half the depth (never the last layer): shallower exits rarely pass and every check costs."""
    return max(0, min(n_layers // 2, n_layers - 2))


def _final_norm(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(dec, name, None), nn.Module):
            return getattr(dec, name)
    raise LeanfmError("early exit needs the decoder's final norm (decoder.norm); this model family is not supported")


class EarlyExitStepper(ModelStepper):
    """Greedy-decoding runner with dynamic early exit. Single-token feeds exit early; longer
    feeds (the prompt) run the full model. ``stats()`` summarizes the decode steps so far."""

    def __init__(self, model: nn.Module, threshold: float, min_layer: int | None = None,
                 check_every: int = 1, criterion: str = "softmax") -> None:
        super().__init__(model)
        check_threshold(threshold)
        n = len(self.layers)
        if n < 2:
            raise LeanfmError("early exit needs a model with at least 2 decoder layers")
        min_layer = default_min_layer(n) if min_layer is None else min_layer
        if not 0 <= min_layer <= n - 2:
            raise LeanfmError(f"min_layer={min_layer} must be in [0, {n - 2}] (the model has {n} decoder layers; exits stop before the last)")
        if check_every < 1:
            raise LeanfmError(f"check_every={check_every} must be >= 1")
        if criterion not in CRITERIA:
            raise LeanfmError(f"criterion '{criterion}' is unknown; use one of {', '.join(CRITERIA)}")
        self.threshold, self.min_layer, self.check_every, self.criterion = float(threshold), min_layer, check_every, criterion
        self.n_layers = n
        self.norm = _final_norm(model)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.layers_used: list[int] = []
        self.checks = 0
        self.skip_query = True  # zeros instead of q_proj during KV copies (the query is unused)

    def _reset(self) -> None:
        super()._reset()
        self.layers_used, self.checks = [], 0

    def checks_at(self, i: int) -> bool:
        return self.min_layer <= i < self.n_layers - 1 and (i - self.min_layer) % self.check_every == 0

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-cap) on hidden states ``[..., hidden]``."""
        logits = self.head(self.norm(h))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # one decode step -----------------------------------------------------------------------
    def _confident(self, h_in: torch.Tensor, h_out: torch.Tensor):
        """(exit?, logits or None) for the last position."""
        self.checks += 1
        if self.criterion == "state":
            cos = F.cosine_similarity(h_out[0, -1].float(), h_in[0, -1].float(), dim=0)
            return bool(cos >= self.threshold), None
        logits = self.head_logits(h_out[:, -1:]).float()
        top2 = torch.softmax(logits[0, -1], dim=-1).topk(2).values
        return bool(top2[0] - top2[1] >= self.threshold), logits

    def _copy_kv(self, i: int, orig, h: torch.Tensor, args, kwargs) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            return
        q = getattr(getattr(self.layers[i], "self_attn", None), "q_proj", None)
        out_f = getattr(q, "out_features", None)
        no_query = {0: (lambda x: x.new_zeros(*x.shape[:-1], out_f))} if self.skip_query and isinstance(out_f, int) else {}
        with patched_forwards([q], no_query):
            try:
                orig(h, *args, **{**kwargs, "past_key_values": _WriteThenStop(cache)})
            except _KVWritten:
                return
        raise LeanfmError(f"early exit could not copy KV into decoder layer {i}: its attention did not write the cache")

    def _wrap(self, i: int, orig, state: dict):
        last = self.n_layers - 1

        def forward(hidden_states, *args, **kwargs):
            if state["exit"] is not None:  # exited earlier: propagate the exit state, fill this layer's KV
                self._copy_kv(i, orig, hidden_states, args, kwargs)
                if i == last and state["logits"] is not None:
                    raise _Exited
                return hidden_states
            out = orig(hidden_states, *args, **kwargs)
            if self.checks_at(i):
                ok, logits = self._confident(hidden_states, out)
                if ok:
                    state["exit"], state["logits"] = i, logits
            return out

        return forward

    @torch.no_grad()
    def _feed(self, new: list[int], start: int, last: int) -> torch.Tensor:
        if len(new) > 1:
            return super()._feed(new, start, last)  # prefill at full depth
        state = {"exit": None, "logits": None}
        wrappers = {i: self._wrap(i, layer.forward, state) for i, layer in enumerate(self.layers)}
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        pos = torch.tensor([[start]], dtype=torch.long, device=self.device)
        with patched_forwards(self.layers, wrappers):
            try:
                out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1:].float()
            except _Exited:
                logits = state["logits"][0, -1:]
        self.layers_used.append(self.n_layers if state["exit"] is None else state["exit"] + 1)
        return logits

    def stats(self) -> dict:
        n = len(self.layers_used)
        hist = Counter(self.layers_used)
        mean = sum(self.layers_used) / n if n else float(self.n_layers)
        return {
            "policy": "early_exit",
            "criterion": self.criterion,
            "threshold": self.threshold,
            "decode_steps": n,
            "n_layers": self.n_layers,
            "mean_layers_used": mean,
            "layer_fraction": mean / self.n_layers,
            "exits": {int(k): int(hist[k]) for k in sorted(hist)},  # layers used -> decode steps
            "early_exit_rate": sum(v for k, v in hist.items() if k < self.n_layers) / n if n else 0.0,
            "checks_per_token": self.checks / n if n else 0.0,
        }


@torch.no_grad()
def early_exit_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, threshold: float,
                        min_layer: int | None = None, check_every: int = 1, criterion: str = "softmax",
                        eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding with early exit. Returns ``([1, P + G] ids, stats)`` (see ``stats()``)."""
    from .speculative import plain_generate

    step = EarlyExitStepper(model, threshold, min_layer, check_every, criterion)
    out, base = plain_generate(step, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    return out, {**step.stats(), "new_tokens": base["new_tokens"], "forward_calls": base["target_forward_calls"]}


@torch.no_grad()
def early_exit_fidelity(model: nn.Module, ids: torch.Tensor, prefix: int, threshold: float,
                        min_layer: int | None = None, check_every: int = 1, criterion: str = "softmax") -> dict:
    """Teacher-forced fidelity on a fixed text ``ids [1, T]``: after a full-depth prefill of
    ``ids[:, :prefix]``, feed the remaining tokens one at a time with early exit (KV copies
    included) and compare each step's top-1 with the full model's on the same prefix.

    Returns the stats plus ``top1_agreement`` and ``scored_tokens``."""
    tokens = prompt_list(ids)
    if not 1 <= prefix < len(tokens):
        raise LeanfmError(f"prefix={prefix} must be in [1, {len(tokens) - 1}] for {len(tokens)} tokens")
    ref = model(input_ids=torch.tensor([tokens], device=next(model.parameters()).device)).logits[0].argmax(-1).tolist()
    step = EarlyExitStepper(model, threshold, min_layer, check_every, criterion)
    step.reset()
    agree = 0
    for t in range(prefix, len(tokens) + 1):
        pred = int(step.sync(tokens[:t])[-1].argmax())
        if t > prefix:  # the prefill's own prediction is full depth: not scored
            agree += int(pred == ref[t - 1])
    n = len(tokens) - prefix
    return {**step.stats(), "top1_agreement": agree / n, "scored_tokens": n}
