"""KV-cache policy configs, their registered handlers, and ``make_cache``.

Applying a policy (``leanfm.apply_(model, StreamingLLMConfig(budget=512))`` or a recipe step
``{method: streaming_llm, budget: 512}``) changes no weight: it records the policy on the model
as ``model.leanfm_kv_policy`` (the config, callable as ``policy(model) -> Cache``) and, for
score-based policies, switches attention to eager and hooks it. Code that runs the model builds
a fresh cache per sequence with ``make_cache(model)`` and passes it as ``past_key_values``.
A model carries one KV policy; applying another replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ...config import BaseConfig, register
from ...errors import LeanfmError
from .caches import H2OCache, QuantizedKVCache, SnapKVCache, StreamingLLMCache, full_attention_layers
from .scores import enable_attention_scores


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise LeanfmError(f"{name}={value} must be a positive number of tokens")


@dataclass
class KVPolicyConfig(BaseConfig):
    """Base of KV-cache policies: ``policy(model)`` returns a fresh cache for one sequence."""

    needs_scores = False

    def make_cache(self, model: nn.Module) -> Cache:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> Cache:
        return self.make_cache(model)

    def check_model(self, model: nn.Module) -> None:
        if not hasattr(model, "config") or not full_attention_layers(model):
            raise LeanfmError(f"{self.method} needs a decoder with full-attention layers; {type(model).__name__} has none")


@dataclass
class StreamingLLMConfig(KVPolicyConfig):
    """StreamingLLM (Xiao et al., ICLR 2024): keep ``sinks`` initial tokens (attention sinks) and the
    most recent ``budget - sinks`` tokens; ``sinks: 0`` is plain window attention.

    budget: cached tokens per full-attention layer (> sinks). sinks: initial tokens always kept.
    positions: "cache" (default, the paper's Sec. 3.2: a token's position is its index in the
        cache, so the sinks stay close to every query) or "original" (true positions; the sinks
        drift ever further away as the stream grows).
    """

    method = "streaming_llm"
    budget: int = 512
    sinks: int = 4
    positions: str = "cache"

    def validate(self) -> None:
        _positive("budget", self.budget)
        if self.sinks < 0:
            raise LeanfmError(f"sinks={self.sinks} must be >= 0")
        if self.budget < self.sinks + 1:
            raise LeanfmError(f"cache budget {self.budget} is smaller than sinks + 1 = {self.sinks + 1}; raise budget or lower sinks")
        if self.positions not in ("cache", "original"):
            raise LeanfmError(f"positions '{self.positions}' must be 'cache' (the paper's) or 'original'")

    def make_cache(self, model):
        return StreamingLLMCache(model, self.budget, self.sinks, self.positions)


@dataclass
class H2OConfig(KVPolicyConfig):
    """H2O (Zhang et al., NeurIPS 2023): keep the tokens with the largest accumulated attention
    ("heavy hitters") plus a recent window. Switches the model to eager attention.

    budget: cached tokens per full-attention layer and KV head.
    recent_ratio: share of the budget given to the most recent tokens, in (0, 1] (paper: 0.5).
    """

    method = "h2o"
    needs_scores = True
    budget: int = 512
    recent_ratio: float = 0.5

    def validate(self) -> None:
        _positive("budget", self.budget)
        if not 0 < self.recent_ratio <= 1:
            raise LeanfmError(f"recent_ratio={self.recent_ratio} must be in (0, 1]")

    @property
    def recent(self) -> int:
        return max(1, round(self.budget * self.recent_ratio))

    def make_cache(self, model):
        return H2OCache(model, self.budget, self.recent)


@dataclass
class SnapKVConfig(KVPolicyConfig):
    """SnapKV (Li et al., 2024): after the prompt's forward, keep per KV head the prompt tokens that
    the last ``window`` prompt queries attend to most (pooled over ``kernel`` neighbours), plus that
    window; decoding then appends. Switches the model to eager attention.

    budget: cached prompt tokens per full-attention layer and KV head (> window).
    window: observation window (last prompt queries that vote). kernel: odd pooling width.
    pooling: "max" or "avg".
    """

    method = "snapkv"
    needs_scores = True
    budget: int = 1024
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def validate(self) -> None:
        _positive("budget", self.budget)
        _positive("window", self.window)
        if self.window >= self.budget:
            raise LeanfmError(f"observation window {self.window} must be smaller than the cache budget {self.budget}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise LeanfmError(f"kernel={self.kernel} must be an odd positive pooling width")
        if self.pooling not in ("max", "avg"):
            raise LeanfmError(f"pooling '{self.pooling}' must be 'max' or 'avg'")

    def make_cache(self, model):
        return SnapKVCache(model, self.budget, self.window, self.kernel, self.pooling)


@dataclass
class KVQuantConfig(KVPolicyConfig):
    """KV-cache quantization: asymmetric int8 or int4 (two codes per byte) with a scale and zero
    per group. No eviction.

    bits: 8 or 4. key_axis / value_axis: "token" (a group is ``group_size`` channels of one
    token's head vector; ``group_size: null`` = one group per token and head) or "channel"
    (a group is ``group_size`` consecutive tokens of one channel, KIVI; the newest fewer than
    ``group_size`` tokens stay in full precision until their group is complete).
    """

    method = "kv_quant"
    bits: int = 8
    group_size: int | None = 32
    key_axis: str = "token"
    value_axis: str = "token"

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise LeanfmError(f"bits={self.bits} is not supported for the KV cache; use 4 or 8")
        if self.group_size is not None and self.group_size < 1:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for one group per head)")
        for name in ("key_axis", "value_axis"):
            axis = getattr(self, name)
            if axis not in ("token", "channel"):
                raise LeanfmError(f"{name} '{axis}' must be 'token' or 'channel'")
            if axis == "channel" and self.group_size is None:
                raise LeanfmError(f"{name}: channel groups need a group_size (tokens per group)")

    def check_model(self, model) -> None:
        super().check_model(model)
        cfg = model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.group_size and "token" in (self.key_axis, self.value_axis) and head_dim % self.group_size:
            raise LeanfmError(f"group_size={self.group_size} does not divide the head dimension {head_dim}")

    def make_cache(self, model):
        return QuantizedKVCache(model, self.bits, self.group_size or 0, self.key_axis, self.value_axis)


def make_cache(model: nn.Module) -> Cache:
    """A fresh cache for one sequence: the model's KV policy, or a plain ``DynamicCache``."""
    policy = getattr(model, "leanfm_kv_policy", None)
    return policy(model) if policy is not None else DynamicCache(config=model.config)


_KERNELS = {
    "streaming_llm": "transformers Cache (torch eviction: sinks + window)",
    "h2o": "transformers Cache + eager attention score hooks (torch eviction)",
    "snapkv": "transformers Cache + eager attention score hooks (torch prompt compression)",
    "kv_quant": "transformers Cache, uint8 codes (int4 packed) dequantized in torch per step",
}


def _attach(model: nn.Module, cfg: KVPolicyConfig, calib=None) -> dict:
    cfg.check_model(model)
    info = {"simulated": False, "kernel": _KERNELS[cfg.method], "kv_layers": len(full_attention_layers(model))}
    previous = getattr(model, "leanfm_kv_policy", None)
    if previous is not None:
        info["replaces"] = previous.method
    if cfg.needs_scores:
        info["attention_before"] = enable_attention_scores(model)
    model.leanfm_kv_policy = cfg
    return info


for _cls in (StreamingLLMConfig, H2OConfig, SnapKVConfig, KVQuantConfig):
    register(_cls)(_attach)
