"""KV-cache policies for any transformers 5 decoder: StreamingLLM, H2O, SnapKV, int8/int4 KV.

Layout: ``decl`` (the configs: torch-free declarations), ``policy_math`` / ``quant_math`` (pure
keep-set and quantization math), ``layers`` (one cache layer per policy), ``caches`` (whole-model
``DynamicCache`` subclasses), ``scores`` (attention probabilities for H2O / SnapKV), ``policies``
(the handler and ``make_cache``). Measuring a bounded cache on long inputs (streaming perplexity,
passkey retrieval) is in :mod:`leanfm.measure.long_context`.

Names below are imported from their submodule on first use (PEP 562), so importing the package
(or its ``decl``) does not load torch.
"""
from .. import lazy_exports

_EXPORTS = {
    "H2OCache": "caches", "KVPolicyCache": "caches", "QuantizedKVCache": "caches", "SnapKVCache": "caches",
    "StreamingLLMCache": "caches",
    "H2OConfig": "decl", "KVQuantConfig": "decl", "SnapKVConfig": "decl", "StreamingLLMConfig": "decl",
    "make_cache": "policies",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
