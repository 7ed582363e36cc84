"""Access to attention probabilities for score-based eviction (H2O, SnapKV).

transformers 5 calls ``Cache.update(key, value, layer_idx)`` before attention and passes neither
queries nor probabilities to the cache. The generic route taken here: switch the model to
``eager`` attention (whose attention function returns the softmax probabilities as the second
output of every attention module, for every family) and register a forward hook on each
attention module. The hook reads ``past_key_values`` from the module's keyword arguments and,
when that cache's layer has an ``observe`` method, hands it the probabilities
``[B, Hq, q, stored]`` of the step; the layer then evicts. Hooks are idempotent and do nothing
for other caches, so the model stays usable with a plain ``DynamicCache``.
"""
from __future__ import annotations

from torch import nn
from transformers.cache_utils import Cache

from ...errors import LeanfmError

_FLAG = "_leanfm_score_hook"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules (those carrying a ``layer_idx`` and a k/v projection)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and (hasattr(m, "k_proj") or type(m).__name__.endswith("Attention"))]


def _hook(module: nn.Module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, Cache) or module.layer_idx >= len(cache.layers):
        return None
    observe = getattr(cache.layers[module.layer_idx], "observe", None)
    if observe is None:
        return None
    probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if probs is None:
        raise LeanfmError(
            "this KV cache policy needs attention probabilities, but the model's attention returned none; "
            "use eager attention (model.set_attn_implementation('eager'))"
        )
    observe(probs.detach())
    return None


def enable_attention_scores(model: nn.Module) -> str:
    """Switch ``model`` to eager attention and hook its attention modules (idempotent).

    Returns the attention implementation the model had before.
    """
    cfg = getattr(model, "config", None)
    before = getattr(cfg, "_attn_implementation", None) or "eager"
    if before != "eager":
        model.set_attn_implementation("eager")
    mods = attention_modules(model)
    if not mods:
        raise LeanfmError(f"found no attention modules with a layer index in {type(model).__name__}")
    for m in mods:
        if not getattr(m, _FLAG, False):
            m.register_forward_hook(_hook, with_kwargs=True)
            setattr(m, _FLAG, True)
    return before
