"""KV-cache size: tokens each layer keeps and the bytes they take.

A layer stores keys and values for ``kv_heads`` heads of ``head_dim`` channels per token:

    bytes = 2 (K and V) x kv_heads x head_dim x stored_tokens x batch x bytes_per_element

summed over layers (Pope et al. 2023, "Efficiently Scaling Transformer Inference", sec. 2: the
KV cache is 2 x layers x kv_heads x head_dim bytes-per-value per token). ``stored_tokens``
after ``t`` tokens have passed through the model:

- full attention, no policy: ``t``;
- sliding-window layers (Mistral, Gemma 3 local layers): ``min(t, window - 1)``, as transformers'
  ``DynamicSlidingWindowLayer`` keeps;
- StreamingLLM / H2O (full-attention layers): ``min(t, budget)``;
- SnapKV: the prompt compressed to ``min(prompt, budget)``, generated tokens appended.

``kv_quant`` stores codes of ``bits`` (two 4-bit codes per byte) plus an fp32 scale and an fp32
zero per group (``methods/kvcache/quant_math.py``): per token and head
``head_dim x bits / 8 + 8 x head_dim / group`` bytes for per-token groups; per-channel groups
(KIVI) quantize only complete groups of ``group`` tokens and keep the rest in full precision.
Sliding layers keep the model's own full-precision cache under any policy.
"""
from __future__ import annotations

from .arch import Arch
from .recipe_effects import KVSpec


def stored_tokens(arch: Arch, kv: KVSpec | None, layer: int, seen: float, prompt: float | None = None) -> float:
    """Tokens layer ``layer`` holds after ``seen`` tokens (``prompt`` of them the prompt)."""
    window = arch.kv_window(layer)
    if window is not None:
        return min(seen, window)
    if kv is None or kv.budget is None:
        return seen
    if kv.prompt_only:  # SnapKV compresses the prompt once, decoding appends
        p = seen if prompt is None else min(prompt, seen)
        return min(p, kv.budget) + (seen - p)
    return min(seen, kv.budget)


def _quant_stream_bytes(kv: KVSpec, axis: str, head_dim: int, tokens: float, full_bytes: float) -> float:
    """Bytes of one stream (K or V) of one head over ``tokens`` tokens under kv_quant."""
    code = head_dim * kv.bits / 8
    if axis == "token":
        g = kv.group_size or head_dim
        return tokens * (code + 8 * head_dim / g)
    g = kv.group_size
    full_groups = int(tokens // g)
    done = full_groups * g
    # per channel and group of g tokens: one fp32 scale + one fp32 zero; the rest full precision
    return done * code + full_groups * head_dim * 8 + (tokens - done) * head_dim * full_bytes


def layer_kv_bytes(arch: Arch, kv: KVSpec | None, layer: int, tokens: float, batch: int, elem_bytes: float) -> float:
    """Bytes of K and V that layer ``layer`` holds for ``tokens`` stored tokens per row."""
    per_head = arch.kv_heads * batch
    if kv is not None and kv.bits is not None and arch.kv_window(layer) is None:
        return per_head * (_quant_stream_bytes(kv, kv.key_axis, arch.head_dim, tokens, elem_bytes)
                           + _quant_stream_bytes(kv, kv.value_axis, arch.head_dim, tokens, elem_bytes))
    return 2 * per_head * arch.head_dim * tokens * elem_bytes


def kv_cache_bytes(arch: Arch, kv: KVSpec | None, seen: float, batch: int, elem_bytes: float, prompt: float | None = None) -> float:
    """Whole-model KV cache after ``seen`` tokens per row (policy budgets and windows applied)."""
    return sum(layer_kv_bytes(arch, kv, i, stored_tokens(arch, kv, i, seen, prompt), batch, elem_bytes) for i in range(arch.layers))


def per_token_bytes(arch: Arch, kv: KVSpec | None, layer: int, elem_bytes: float) -> float:
    """Average bytes one cached token of one row takes in ``layer`` (for reads in a forward)."""
    if kv is not None and kv.bits is not None and arch.kv_window(layer) is None:
        big = 1 << 20  # long-run average: per-channel residual groups amortized away
        return layer_kv_bytes(arch, kv, layer, big, 1, elem_bytes) / big
    return 2 * arch.kv_heads * arch.head_dim * elem_bytes
