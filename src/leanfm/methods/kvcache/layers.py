"""Per-layer caches for transformers 5.x (``CacheLayerMixin`` / ``DynamicLayer`` subclasses).

Positions. Keys arrive from the model already rotated (post-RoPE: transformers 5 applies rotary
before ``Cache.update`` and passes no sin/cos to it). The evicting layers keep those keys as they
are, with their *original* positions, and ``get_seq_length`` reports the number of tokens seen,
so the next tokens get their true positions too (that is also what ``generate`` does: it derives
position ids from the attention mask): the relative distances are the true ones.
``CachePositionStreamingLayer`` instead does what StreamingLLM's paper does (Xiao et al. 2024,
Sec. 3.2, "positional encoding in the cache"): positions are indices *inside the cache*, so the
sinks sit at 0..s-1, the window right after them, and the next query at the cache length. It
stores keys un-rotated (rotated back by their position on arrival) and rotates them by their
cache index on every step.

Mask. The kept keys are in chronological order with the new tokens last. ``get_mask_sizes``
tells the mask builder that the cache spans ``[seen - stored, seen + q)``: every kept key sits
below every query (visible), the new keys get their true positions (causal among themselves).
This is exact for unpadded input; a 2-D padding mask would be read at those virtual positions.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...errors import LeanfmError
from .policy_math import gather_tokens, group_scores, h2o_keep, snapkv_keep, snapkv_scores, tova_keep
from .quant_math import dequantize, pack_nibbles, quantize, unpack_nibbles


class EvictingLayer(DynamicLayer):
    """A full-attention layer holding at most ``budget`` tokens after each forward."""

    is_croppable = False

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget
        self.cumulative_length = 0  # tokens seen (reset() zeroes it)

    def stored_length(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 4 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.budget

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} evicts tokens and cannot be rolled back (crop)")

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values


class StreamingLayer(EvictingLayer):
    """StreamingLLM: ``sinks`` first tokens + the most recent ``budget - sinks`` (no scores needed)."""

    def __init__(self, budget: int, sinks: int):
        super().__init__(budget)
        self.sinks = sinks

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self._append(key_states, value_states)
        self._evict(keys, values)
        return keys, values

    def _evict(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the keep set (sinks + newest window) of the appended ``keys`` / ``values``; the
        current queries still see all of them (kept + new)."""
        n = keys.shape[-2]
        if n > self.budget:
            start = n - (self.budget - self.sinks)
            self.keys = torch.cat([keys[..., : self.sinks, :], keys[..., start:, :]], dim=-2)
            self.values = torch.cat([values[..., : self.sinks, :], values[..., start:, :]], dim=-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE pairing of transformers' Llama-family models: (x1, x2) -> (-x2, x1) over halves."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class RopeTable:
    """cos / sin of ``p * inv_freq`` for positions 0..n-1, grown on demand; one per cache, shared
    by its layers (so ``kv_cache_bytes`` counts it once)."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float().cpu()
        self.cos = self.sin = None

    def get(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != device:
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None]
            emb = torch.cat([freqs, freqs], dim=-1).to(device)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[:n], self.sin[:n]


class CachePositionStreamingLayer(StreamingLayer):
    """StreamingLLM with positions assigned within the cache (the paper's scheme).

    RoPE rotates the pair (x_i, x_{i+d/2}) by the angle p * inv_freq_i (Su et al. 2021, eq. 34 in
    the rotate-half layout); rotations compose, so R(-p) undoes the model's rotation at position
    p exactly (up to rounding) and any model-side scaling of cos/sin (``attention_scaling``)
    survives unchanged. ``get_seq_length`` is the stored length, so the model gives the new
    tokens positions ``stored .. stored + q - 1``; after the append every kept key is rotated to
    its index ``0 .. n - 1``. Stored keys are un-rotated, so no rounding accumulates over a stream.
    """

    def __init__(self, budget: int, sinks: int, table: RopeTable):
        super().__init__(budget, sinks)
        self.table = table

    def get_seq_length(self) -> int:
        return self.stored_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored_length() + query_length, 0

    def _rotate(self, x: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        cos, sin = self.table.get(max(start + x.shape[-2], self.budget + 1), x.device)
        cos, sin = cos[start: start + x.shape[-2]], sin[start: start + x.shape[-2]]
        xf = x.float()
        return (xf * cos + rotate_half(xf) * (-sin if inverse else sin)).to(x.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        raw_new = self._rotate(key_states, self.stored_length(), inverse=True)  # the model rotated them there
        raw, values = self._append(raw_new, value_states)
        self._evict(raw, values)  # stored un-rotated
        return self._rotate(raw, 0, inverse=False), values  # every key at its index in the cache


class ScoredLayer(EvictingLayer):
    """A layer that evicts after seeing the attention probabilities of the step (``observe``).

    ``update`` stores everything; the score hook (``scores.enable_attention_scores``) then calls
    ``observe(probs)`` with the eager attention probabilities ``[B, Hq, q, stored]``.
    """

    def __init__(self, budget: int):
        super().__init__(budget)
        self._unobserved = False

    def update(self, key_states, value_states, *args, **kwargs):
        if self._unobserved:
            raise LeanfmError(
                f"{type(self).__name__} got no attention scores: build it with leanfm.methods.kvcache.make_cache(model) "
                "or pass the model to the cache, which switches the model to eager attention and hooks it"
            )
        self._unobserved = True
        return self._append(key_states, value_states)

    def observe(self, probs: torch.Tensor) -> None:
        self._unobserved = False
        self._evict(probs)

    def _evict(self, probs: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _keep(self, idx: torch.Tensor) -> None:
        self.keys = gather_tokens(self.keys, idx)
        self.values = gather_tokens(self.values, idx)

    def reset(self) -> None:
        super().reset()
        self._unobserved = False


class H2OLayer(ScoredLayer):
    """H2O: accumulated attention per cached token; keep heavy hitters + ``recent`` newest."""

    def __init__(self, budget: int, recent: int):
        super().__init__(budget)
        self.recent = recent
        self.scores: torch.Tensor | None = None  # [B, Hkv, stored] float32

    def _evict(self, probs: torch.Tensor) -> None:
        n_kv = self.keys.shape[1]
        step = group_scores(probs, n_kv)  # attention received in this step, [B, Hkv, stored]
        old = self.scores if self.scores is not None else step.new_zeros(*step.shape[:2], 0)
        pad = step.new_zeros(*step.shape[:2], step.shape[-1] - old.shape[-1])
        self.scores = torch.cat([old, pad], dim=-1) + step
        if step.shape[-1] > self.budget:
            idx = h2o_keep(self.scores, self.budget, self.recent)
            self._keep(idx)
            self.scores = self.scores.gather(-1, idx)

    def reset(self) -> None:
        super().reset()
        self.scores = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.scores is not None:
            self.scores = self.scores.index_select(0, beam_idx.to(self.scores.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.scores is not None:
            self.scores = self.scores.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.scores is not None:
            self.scores = self.scores[indices, ...]


class TOVALayer(ScoredLayer):
    """TOVA: after each forward that leaves more than ``budget`` tokens, keep the ``budget`` the
    last query of that forward attends to most (head-averaged; the same tokens for every KV
    head). In decode that is the paper's one-token-per-step eviction; a multi-token forward (the
    prompt) is compressed once by its last query's attention."""

    def _evict(self, probs: torch.Tensor) -> None:
        n = probs.shape[-1]
        if n <= self.budget:
            return
        last = probs[:, :, -1, :].float().mean(dim=1)  # [B, n]: newest query, averaged over query heads
        idx = tova_keep(last, self.budget)  # [B, k]
        self._keep(idx[:, None, :].expand(-1, self.keys.shape[1], -1))


class SnapKVLayer(ScoredLayer):
    """SnapKV: after a multi-token forward (a prefill) that leaves more than ``budget`` tokens,
    keep the prefix tokens voted for by the last ``window`` queries, plus that window. Single-token
    decode steps append without compressing, as in the paper (the prompt is what gets compressed)."""

    def __init__(self, budget: int, window: int, kernel: int, pooling: str):
        super().__init__(budget)
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def _evict(self, probs: torch.Tensor) -> None:
        q, n = probs.shape[-2], probs.shape[-1]
        if q == 1 or n <= self.budget:
            return
        w = min(self.window, q)
        scores = snapkv_scores(probs, self.keys.shape[1], w, self.kernel, self.pooling)
        self._keep(snapkv_keep(scores, n, self.budget, w))


class _QuantStore:
    """One quantized stream (keys or values) of a layer: codes + scale + zero, and for
    per-channel groups a full-precision residual of fewer than ``group_size`` tokens (KIVI)."""

    def __init__(self, bits: int, group_size: int, axis: str):
        self.bits, self.group_size, self.axis = bits, group_size, axis
        self.codes = self.scale = self.zero = self.residual = None

    def _quantize(self, x: torch.Tensor) -> None:
        gs = self.group_size or x.shape[-1]
        codes, scale, zero = quantize(x, self.bits, gs, axis=-1 if self.axis == "token" else -2)
        codes = pack_nibbles(codes) if self.bits == 4 else codes
        if self.codes is None:
            self.codes, self.scale, self.zero = codes, scale, zero
        else:
            self.codes = torch.cat([self.codes, codes], dim=-2)
            self.scale = torch.cat([self.scale, scale], dim=-2)
            self.zero = torch.cat([self.zero, zero], dim=-2)

    def append(self, x: torch.Tensor) -> None:
        if self.axis == "token":
            self._quantize(x)
            return
        res = x if self.residual is None else torch.cat([self.residual, x], dim=-2)
        full = res.shape[-2] // self.group_size * self.group_size
        if full:
            self._quantize(res[..., :full, :])
        self.residual = res[..., full:, :]

    def read(self, like: torch.Tensor) -> torch.Tensor:
        """All stored tokens, dequantized to ``like``'s dtype: ``[B, H, stored, D]``."""
        parts = []
        if self.codes is not None:
            codes = unpack_nibbles(self.codes) if self.bits == 4 else self.codes
            gs = self.group_size or codes.shape[-1]
            parts.append(dequantize(codes, self.scale, self.zero, gs, axis=-1 if self.axis == "token" else -2, dtype=like.dtype))
        if self.residual is not None:
            parts.append(self.residual)
        if not parts:
            return like[..., :0, :]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def map_(self, fn) -> None:
        for name in ("codes", "scale", "zero", "residual"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class QuantizedKVLayer(DynamicLayer):
    """Keys and values stored as int8 / packed int4 codes with per-group scale and zero.

    The current forward's own tokens are attended in full precision; everything cached before it
    is dequantized on read. Only codes, scales, zeros (and a per-channel residual) are held, so
    ``tensor_bytes`` of the cache counts the real storage.
    """

    is_croppable = False

    def __init__(self, bits: int, group_size: int, key_axis: str, value_axis: str):
        super().__init__()
        self.cumulative_length = 0
        self.k = _QuantStore(bits, group_size, key_axis)
        self.v = _QuantStore(bits, group_size, value_axis)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = self.values = None  # nothing full-precision is kept

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_k, old_v = self.k.read(key_states), self.v.read(value_states)
        self.k.append(key_states)
        self.v.append(value_states)
        self.cumulative_length += key_states.shape[-2]
        return torch.cat([old_k, key_states], dim=-2), torch.cat([old_v, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.k = _QuantStore(self.k.bits, self.k.group_size, self.k.axis)
        self.v = _QuantStore(self.v.bits, self.v.group_size, self.v.axis)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVLayer cannot be rolled back (crop)")

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def _map(self, fn) -> None:
        self.k.map_(fn)
        self.v.map_(fn)
