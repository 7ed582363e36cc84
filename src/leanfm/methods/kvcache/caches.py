"""Whole-model caches: a ``DynamicCache`` whose full-attention layers follow a KV policy.

Layers the model marks as sliding-window (Gemma 3's local layers) or chunked keep the model's own
``DynamicSlidingWindowLayer``: they are already bounded by the window they were trained with, and
giving them sinks or heavy hitters would change what the model computes. Budgets therefore apply
to each full-attention layer, per batch row and KV head.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, get_layer_types_and_kwargs

from ...errors import LeanfmError
from .layers import CachePositionStreamingLayer, H2OLayer, QuantizedKVLayer, RopeTable, SnapKVLayer, StreamingLayer, TOVALayer
from .scores import enable_attention_scores


def _config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True)


def full_attention_layers(model_or_config) -> list[int]:
    """Indices of the layers a KV policy applies to."""
    types, _ = get_layer_types_and_kwargs(_config(model_or_config))
    return [i for i, t in enumerate(types) if t == "full_attention"]


class KVPolicyCache(DynamicCache):
    """``DynamicCache`` with ``make_layer()`` for every full-attention layer, native layers elsewhere."""

    def __init__(self, model_or_config, make_layer: Callable[[], object]):
        types, kwargs = get_layer_types_and_kwargs(_config(model_or_config))
        if "full_attention" not in types:
            raise LeanfmError("the model has no full-attention layers: a KV cache policy has nothing to bound")
        layers = [make_layer() if t == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(types, kwargs)]
        Cache.__init__(self, layers=layers)


def rope_inv_freq(model: nn.Module):
    """The rotary frequencies of the model's full-attention layers (``inv_freq`` of its rotary
    module; Gemma 3 keeps one set per layer type). Raises when the model has no RoPE module."""
    for name, mod in model.named_modules():
        freq = getattr(mod, "full_attention_inv_freq", None)
        if freq is None and name.endswith("rotary_emb"):
            freq = getattr(mod, "inv_freq", None)
        if freq is not None:
            return freq
    raise LeanfmError(f"{type(model).__name__} has no rotary embedding module; use StreamingLLM positions: original")


class StreamingLLMCache(KVPolicyCache):
    """StreamingLLM (attention sinks + recent window); works with any attention implementation.

    positions: "cache" (the paper's scheme: positions are indices inside the cache; needs the
    model, for its RoPE frequencies) or "original" (keys keep their true positions).
    """

    def __init__(self, model_or_config, budget: int, sinks: int = 4, positions: str = "original"):
        if positions == "cache":
            if not isinstance(model_or_config, nn.Module):
                raise LeanfmError("StreamingLLM positions: cache needs the model (its RoPE frequencies), not a config")
            table = RopeTable(rope_inv_freq(model_or_config))
            make = lambda: CachePositionStreamingLayer(budget, sinks, table)  # noqa: E731
        elif positions == "original":
            make = lambda: StreamingLayer(budget, sinks)  # noqa: E731
        else:
            raise LeanfmError(f"StreamingLLM positions '{positions}' must be 'cache' or 'original'")
        super().__init__(model_or_config, make)


class H2OCache(KVPolicyCache):
    """H2O heavy hitters + recent window. Needs the model: switches it to eager attention and
    hooks its attention modules (see ``scores``)."""

    def __init__(self, model: nn.Module, budget: int, recent: int):
        enable_attention_scores(model)
        super().__init__(model, lambda: H2OLayer(budget, recent))


class SnapKVCache(KVPolicyCache):
    """SnapKV prompt compression. Needs the model (eager attention + hooks, as ``H2OCache``)."""

    def __init__(self, model: nn.Module, budget: int, window: int = 32, kernel: int = 7, pooling: str = "max"):
        enable_attention_scores(model)
        super().__init__(model, lambda: SnapKVLayer(budget, window, kernel, pooling))


class TOVACache(KVPolicyCache):
    """TOVA: keep the tokens the newest query attends to most. Needs the model (eager attention +
    hooks, as ``H2OCache``)."""

    def __init__(self, model: nn.Module, budget: int):
        enable_attention_scores(model)
        super().__init__(model, lambda: TOVALayer(budget))


class QuantizedKVCache(KVPolicyCache):
    """int8 / packed int4 keys and values with per-group scales (full-attention layers)."""

    def __init__(self, model_or_config, bits: int = 8, group_size: int = 32, key_axis: str = "token", value_axis: str = "token"):
        super().__init__(model_or_config, lambda: QuantizedKVLayer(bits, group_size, key_axis, value_axis))
