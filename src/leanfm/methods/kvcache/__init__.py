"""KV-cache policies for any transformers 5 decoder: StreamingLLM, H2O, SnapKV, int8/int4 KV.

Layout: ``decl`` (the configs: torch-free declarations), ``policy_math`` / ``quant_math`` (pure
keep-set and quantization math), ``layers`` (one cache layer per policy), ``caches`` (whole-model
``DynamicCache`` subclasses), ``scores`` (attention probabilities for H2O / SnapKV), ``policies``
(the handler and ``make_cache``), ``long_context`` (streaming perplexity and passkey retrieval).

Names below are imported from their submodule on first use (PEP 562), so importing the package
(or its ``decl``) does not load torch.
"""
from importlib import import_module

_EXPORTS = {
    "H2OCache": "caches", "KVPolicyCache": "caches", "QuantizedKVCache": "caches", "SnapKVCache": "caches",
    "StreamingLLMCache": "caches",
    "H2OConfig": "decl", "KVQuantConfig": "decl", "SnapKVConfig": "decl", "StreamingLLMConfig": "decl",
    "make_cache": "policies",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
