"""KV-cache policy declarations (torch-free): ``streaming_llm``, ``h2o``, ``tova``, ``snapkv``, ``kv_quant``.

Each config is the one declaration of its method: parameters and checks, the handler that
attaches it (:func:`leanfm.methods.kvcache.policies.attach_kv_policy`, imported on first
apply), what executes it (``runs_on``) and its cost effect for the predictor. The cache classes
(torch) are imported only when a cache is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import BaseConfig
from ...errors import LeanfmError
from ..effects import KVSpec
from ...space import Choice, Range


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise LeanfmError(f"{name}={value} must be a positive number of tokens")


@dataclass
class KVPolicyConfig(BaseConfig):
    """Base of KV-cache policies: ``policy(model)`` returns a fresh cache for one sequence."""

    handler = "leanfm.methods.kvcache.policies:attach_kv_policy"
    produces = "kv-policy"
    needs_scores = False
    runs_on: ClassVar[str] = ""  # what executes the policy (the step's reported ``kernel``)

    def make_cache(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model):
        return self.make_cache(model)

    def check_model(self, model) -> None:
        from .caches import full_attention_layers

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

    search_space = {"budget": Choice(128, 256, 512, 1024)}

    method = "streaming_llm"
    runs_on: ClassVar[str] = "transformers Cache (torch eviction: sinks + window)"
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
        from .caches import StreamingLLMCache

        return StreamingLLMCache(model, self.budget, self.sinks, self.positions)

    def effect(self, eff) -> None:
        eff.kv = KVSpec(self.method, budget=int(self.budget), sinks=int(self.sinks))


@dataclass
class H2OConfig(KVPolicyConfig):
    """H2O (Zhang et al., NeurIPS 2023): keep the tokens with the largest accumulated attention
    ("heavy hitters") plus a recent window. Switches the model to eager attention.

    budget: cached tokens per full-attention layer and KV head.
    recent_ratio: share of the budget given to the most recent tokens, in (0, 1] (paper: 0.5).
    """

    search_space = {"budget": Choice(128, 256, 512, 1024)}

    method = "h2o"
    needs_scores = True
    runs_on: ClassVar[str] = "transformers Cache + eager attention score hooks (torch eviction)"
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
        from .caches import H2OCache

        return H2OCache(model, self.budget, self.recent)

    def effect(self, eff) -> None:
        eff.kv = KVSpec(self.method, budget=int(self.budget))


@dataclass
class TOVAConfig(KVPolicyConfig):
    """TOVA (Oren et al., 2024): when the cache is full, drop the token the newest query attends to
    least (attention averaged over the layer's heads). Switches the model to eager attention.

    budget: cached tokens per full-attention layer (the same tokens for every KV head).
    A prompt longer than the budget is compressed once by its last query's attention.
    """

    search_space = {"budget": Choice(128, 256, 512, 1024)}

    method = "tova"
    needs_scores = True
    runs_on: ClassVar[str] = "transformers Cache + eager attention score hooks (torch eviction)"
    budget: int = 512

    def validate(self) -> None:
        _positive("budget", self.budget)

    def make_cache(self, model):
        from .caches import TOVACache

        return TOVACache(model, self.budget)

    def effect(self, eff) -> None:  # an eviction budget, priced as StreamingLLM's and H2O's
        eff.kv = KVSpec(self.method, budget=int(self.budget))


@dataclass
class SnapKVConfig(KVPolicyConfig):
    """SnapKV (Li et al., 2024): after the prompt's forward, keep per KV head the prompt tokens that
    the last ``window`` prompt queries attend to most (pooled over ``kernel`` neighbours), plus that
    window; decoding then appends. Switches the model to eager attention.

    budget: cached prompt tokens per full-attention layer and KV head (> window).
    window: observation window (last prompt queries that vote). kernel: odd pooling width.
    pooling: "max" or "avg".
    """

    search_space = {"budget": Choice(128, 256, 512, 1024)}

    method = "snapkv"
    needs_scores = True
    runs_on: ClassVar[str] = "transformers Cache + eager attention score hooks (torch prompt compression)"
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
        from .caches import SnapKVCache

        return SnapKVCache(model, self.budget, self.window, self.kernel, self.pooling)

    def effect(self, eff) -> None:
        eff.kv = KVSpec(self.method, budget=int(self.budget), prompt_only=True)


@dataclass
class KVQuantConfig(KVPolicyConfig):
    """KV-cache quantization: asymmetric int8 or int4 (two codes per byte) with a scale and zero
    per group. No eviction.

    bits: 8 or 4. key_axis / value_axis: "token" (a group is ``group_size`` channels of one
    token's head vector; ``group_size: null`` = one group per token and head) or "channel"
    (a group is ``group_size`` consecutive tokens of one channel, KIVI; the newest fewer than
    ``group_size`` tokens stay in full precision until their group is complete).
    """

    search_space = {"bits": Choice(4, 8)}

    method = "kv_quant"
    runs_on: ClassVar[str] = "transformers Cache, uint8 codes (int4 packed) dequantized in torch per step"
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
        from .caches import QuantizedKVCache

        return QuantizedKVCache(model, self.bits, self.group_size or 0, self.key_axis, self.value_axis)

    def effect(self, eff) -> None:
        eff.kv = KVSpec(self.method, bits=int(self.bits), group_size=self.group_size, key_axis=self.key_axis,
                        value_axis=self.value_axis)
