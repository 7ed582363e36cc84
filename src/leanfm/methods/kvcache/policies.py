"""KV-cache policy handler and ``make_cache`` (the configs are declared in :mod:`.decl`).

Applying a policy (``leanfm.apply_(model, StreamingLLMConfig(budget=512))`` or a recipe step
``{method: streaming_llm, budget: 512}``) changes no weight: it records the policy on the model
as ``model.leanfm_kv_policy`` (the config, callable as ``policy(model) -> Cache``) and, for
score-based policies, switches attention to eager and hooks it. Code that runs the model builds
a fresh cache per sequence with ``make_cache(model)`` and passes it as ``past_key_values``.
A model carries one KV policy; applying another replaces it.
"""
from __future__ import annotations

from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .caches import full_attention_layers
from .decl import H2OConfig, KVPolicyConfig, KVQuantConfig, SnapKVConfig, StreamingLLMConfig  # noqa: F401 (old import path)
from .scores import enable_attention_scores


def make_cache(model: nn.Module) -> Cache:
    """A fresh cache for one sequence: the model's KV policy, or a plain ``DynamicCache``."""
    policy = getattr(model, "leanfm_kv_policy", None)
    return policy(model) if policy is not None else DynamicCache(config=model.config)


def attach_kv_policy(model: nn.Module, cfg: KVPolicyConfig, calib=None) -> dict:
    """Handler of every KV policy: attach ``cfg`` as the model's KV policy (replacing any earlier one)."""
    cfg.check_model(model)
    info = {"simulated": False, "kernel": cfg.runs_on, "kv_layers": len(full_attention_layers(model))}
    previous = getattr(model, "leanfm_kv_policy", None)
    if previous is not None:
        info["replaces"] = previous.method
    if cfg.needs_scores:
        info["attention_before"] = enable_attention_scores(model)
    model.leanfm_kv_policy = cfg
    return info


_attach = attach_kv_policy  # the handler's earlier name
