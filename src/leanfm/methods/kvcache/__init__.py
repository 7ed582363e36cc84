"""KV-cache policies for any transformers 5 decoder: StreamingLLM, H2O, SnapKV, int8/int4 KV.

Layout: ``policy_math`` / ``quant_math`` (pure keep-set and quantization math), ``layers`` (one
cache layer per policy), ``caches`` (whole-model ``DynamicCache`` subclasses), ``scores``
(attention probabilities for H2O / SnapKV), ``policies`` (configs, handlers, ``make_cache``),
``long_context`` (streaming perplexity and passkey retrieval).
"""
from .caches import H2OCache, KVPolicyCache, QuantizedKVCache, SnapKVCache, StreamingLLMCache  # noqa: F401
from .policies import H2OConfig, KVQuantConfig, SnapKVConfig, StreamingLLMConfig, make_cache  # noqa: F401
