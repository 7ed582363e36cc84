"""KV-cache policies: keep-set math, quantization round trips, cache classes on tiny models,
streaming perplexity, passkey harness, and one-line errors for bad parameters."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import leanfm
from leanfm.config import config_from_dict
from leanfm.errors import LeanfmError
from leanfm.measure.memory import tensor_bytes
from leanfm.methods.kvcache import (H2OCache, H2OConfig, KVQuantConfig, QuantizedKVCache, SnapKVCache,
                                    StreamingLLMCache, StreamingLLMConfig, make_cache)
from leanfm.methods.kvcache.layers import H2OLayer
from leanfm.measure.long_context import passkey_accuracy, passkey_prompt, stream_perplexity
from leanfm.methods.kvcache.policy_math import group_scores, h2o_keep, snapkv_keep, snapkv_scores, streaming_keep
from leanfm.methods.kvcache.quant_math import dequantize, pack_nibbles, quantize, unpack_nibbles
from tests.conftest import tiny_gemma3, tiny_llama, tiny_tokenizer

FAMILIES = pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
IDS = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def full_attention_layers(cache):
    return [layer for layer, sliding in zip(cache.layers, cache.is_sliding) if not sliding]


def run_steps(model, cache, ids, prefill: int, chunk: int = 1) -> torch.Tensor:
    """Logits of ``ids`` fed as a ``prefill``-token forward and then ``chunk``-token forwards."""
    outs = [model(ids[:, :prefill], past_key_values=cache).logits]
    for s in range(prefill, ids.shape[1], chunk):
        outs.append(model(ids[:, s: s + chunk], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- pure policy math
def test_streaming_keep_hand_examples():
    assert streaming_keep(5, 8, 2).tolist() == [0, 1, 2, 3, 4]
    assert streaming_keep(10, 6, 2).tolist() == [0, 1, 6, 7, 8, 9]
    assert streaming_keep(10, 4, 0).tolist() == [6, 7, 8, 9]


def test_h2o_keep_heavy_hitters_plus_recent_per_head():
    scores = torch.tensor([[5.0, 1, 4, 0, 3, 2, 0, 0],
                           [0.0, 9, 0, 8, 0, 7, 0, 0]])
    assert h2o_keep(scores, budget=5, recent=2).tolist() == [[0, 2, 4, 6, 7], [1, 3, 5, 6, 7]]
    assert h2o_keep(scores, budget=3, recent=3).tolist() == [[5, 6, 7]] * 2  # recent_ratio 1 = window
    assert h2o_keep(scores[:, :4], budget=5, recent=2).tolist() == [[0, 1, 2, 3]] * 2


def test_group_scores_sums_queries_and_gqa_groups():
    probs = torch.arange(24, dtype=torch.float).view(1, 4, 2, 3)  # [B, Hq=4, q=2, n=3]
    got = group_scores(probs, n_kv_heads=2)
    want = probs.sum(2).view(1, 2, 2, 3).sum(2)
    assert torch.equal(got, want)
    assert torch.equal(group_scores(probs, 2, rows=1), probs[:, :, 1:].sum(2).view(1, 2, 2, 3).sum(2))


def test_snapkv_pooling_and_selection():
    probs = torch.zeros(1, 1, 2, 8)  # window of 2 queries over n = 8 keys (prefix = 6)
    probs[0, 0, :, 2] = 1.0
    probs[0, 0, 1, 5] = 0.5
    assert snapkv_scores(probs, 1, window=2, kernel=1, pooling="max").tolist() == [[[0, 0, 2, 0, 0, 0.5]]]
    pooled = snapkv_scores(probs, 1, window=2, kernel=3, pooling="max")
    assert pooled.tolist() == [[[0, 2, 2, 2, 0.5, 0.5]]]
    scores = torch.tensor([[[0.0, 3, 0, 2, 0, 1]]])
    assert snapkv_keep(scores, n=8, budget=5, window=2).tolist() == [[[1, 3, 5, 6, 7]]]
    assert snapkv_keep(scores, n=8, budget=8, window=2).tolist() == [[list(range(8))]]


# ---------------------------------------------------------------- quantization math
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quant_round_trip_error_within_half_step(bits, axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 32, generator=g) * torch.logspace(-2, 1, 32)  # outlier channels
    codes, scale, zero = quantize(x, bits, 8, axis=axis)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    back = dequantize(codes, scale, zero, 8, axis=axis)
    step = scale.repeat_interleave(8, dim=axis)
    assert ((x - back).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()
    sqnr = 10 * math.log10(x.pow(2).mean() / (x - back).pow(2).mean())
    assert sqnr > (40 if bits == 8 else 15)


def test_quant_constant_group_exact_and_nibbles_round_trip():
    x = torch.full((1, 1, 2, 8), 3.25)
    codes, scale, zero = quantize(x, 4, 8)
    assert torch.equal(dequantize(codes, scale, zero, 8), x)
    c = torch.randint(0, 16, (3, 5, 10), dtype=torch.uint8)
    packed = pack_nibbles(c)
    assert packed.shape == (3, 5, 5) and torch.equal(unpack_nibbles(packed), c)


# ---------------------------------------------------------------- cache classes on tiny models
def test_streaming_cache_bounded_keeps_sinks():
    model = tiny_llama()
    full = DynamicCache(config=model.config)
    model(IDS, past_key_values=full)
    cache = StreamingLLMCache(model, budget=12, sinks=4)
    for i in range(IDS.shape[1]):
        model(IDS[:, i: i + 1], past_key_values=cache)
        assert all(layer.keys.shape[-2] <= 12 for layer in cache.layers)
    assert cache.get_seq_length() == IDS.shape[1]
    layer, ref = cache.layers[0], full.layers[0]  # layer 0's keys depend only on token and position
    assert torch.allclose(layer.keys[..., :4, :], ref.keys[..., :4, :], atol=1e-6)  # the sinks
    assert torch.allclose(layer.keys[..., 4:, :], ref.keys[..., -8:, :], atol=1e-6)  # the window


@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_cache_equals_masked_full_attention(chunk):
    """Eviction with original positions: same logits as one full forward under the policy's mask."""
    model, (budget, sinks), prefill = tiny_llama(), (10, 3), 6
    n = IDS.shape[1]
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    starts = [0] + list(range(prefill, n, chunk))
    for a, b in zip(starts, starts[1:] + [n]):
        kept = streaming_keep(a, budget, sinks)
        for i in range(a, b):
            mask[0, 0, i, kept] = 0
            mask[0, 0, i, a: i + 1] = 0
    want = model(IDS, attention_mask=mask, use_cache=False).logits
    got = run_steps(model, StreamingLLMCache(model, budget, sinks), IDS, prefill, chunk)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, model(IDS).logits, atol=1e-3)  # eviction really happened


@FAMILIES
def test_cache_positions_without_eviction_equal_full_cache(make):
    model = make()
    want = model(IDS).logits
    got = run_steps(model, StreamingLLMCache(model, budget=64, sinks=4, positions="cache"), IDS, prefill=5)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_gemma3(layer_types=["full_attention", "sliding_attention", "full_attention"])],
                         ids=["llama", "gemma3-global-first"])
def test_cache_positions_reposition_kept_keys(make):
    """After eviction, layer 0's kept keys (which depend only on token and position) equal those
    a fresh forward computes for the kept tokens placed at positions 0..n-1; queries then see
    the cache length as their position. (Gemma 3: global layers use their own RoPE base.)"""
    model, budget, sinks = make(), 12, 3
    cache = StreamingLLMCache(model, budget, sinks, positions="cache")
    run_steps(model, cache, IDS, prefill=4, chunk=1)
    layer = full_attention_layers(cache)[0]
    assert cache.layers.index(layer) == 0
    n = IDS.shape[1]
    kept = torch.cat([IDS[:, :sinks], IDS[:, n - (budget - sinks):]], dim=1)
    fresh = DynamicCache(config=model.config)
    model(kept, past_key_values=fresh)
    li = cache.layers.index(layer)
    assert torch.allclose(layer._rotate(layer.keys, 0, inverse=False), fresh.layers[li].keys, atol=1e-5)
    assert torch.allclose(layer.values, fresh.layers[li].values, atol=1e-5)
    assert layer.get_seq_length() == budget and layer.cumulative_length == n
    other = run_steps(model, StreamingLLMCache(model, budget, sinks, positions="original"), IDS, 4)
    again = run_steps(model, StreamingLLMCache(model, budget, sinks, positions="cache"), IDS, 4)
    assert not torch.allclose(other[:, -1], again[:, -1], atol=1e-4)  # the positions really differ


def test_cache_positions_bad_input():
    model = tiny_llama()
    with pytest.raises(LeanfmError, match="positions 'abs' must be"):
        StreamingLLMConfig(positions="abs").validate()
    with pytest.raises(LeanfmError, match="needs the model"):
        StreamingLLMCache(model.config, 8, 2, positions="cache")


def _policy_caches(model, budget):
    return [StreamingLLMCache(model, budget, 4), H2OCache(model, budget, 4), SnapKVCache(model, budget, 4)]


@FAMILIES
@pytest.mark.parametrize("chunk", [1, 3])
def test_every_policy_with_big_budget_reproduces_full_cache(make, chunk):
    model = make()
    want = run_steps(model, DynamicCache(config=model.config), IDS, prefill=20, chunk=chunk)
    for cache in _policy_caches(model, budget=64):
        got = run_steps(model, cache, IDS, prefill=20, chunk=chunk)
        assert torch.allclose(got, want, atol=1e-5), type(cache).__name__


def test_score_policies_batch_rows_independent():
    """Per-row keep sets: a batch of two evicts exactly as each row alone."""
    model, ids = tiny_llama(), torch.cat([IDS, IDS.flip(1)])
    for make in (lambda: H2OCache(model, 8, 2), lambda: SnapKVCache(model, 8, 2)):
        both = run_steps(model, make(), ids, prefill=20, chunk=2)
        rows = torch.cat([run_steps(model, make(), ids[i: i + 1], prefill=20, chunk=2) for i in range(2)])
        assert torch.allclose(both, rows, atol=1e-5)


@FAMILIES
def test_score_policies_stay_bounded(make):
    model = make()
    h2o, snap = H2OCache(model, 10, 4), SnapKVCache(model, 12, 4)
    run_steps(model, h2o, IDS, prefill=20)
    assert all(layer.keys.shape[-2] == 10 and layer.scores.shape[-1] == 10 for layer in full_attention_layers(h2o))
    model(IDS[:, :30], past_key_values=snap)
    full = DynamicCache(config=model.config)
    model(IDS[:, :30], past_key_values=full)
    for layer, ref in zip(full_attention_layers(snap), full_attention_layers(full)):
        assert layer.keys.shape[-2] == 12  # prefill keys are exact: compression happens after the forward
        assert torch.allclose(layer.keys[..., -4:, :], ref.keys[..., -4:, :], atol=1e-6)  # observation window kept
    for i in range(30, 35):
        model(IDS[:, i: i + 1], past_key_values=snap)
    assert all(layer.keys.shape[-2] == 17 for layer in full_attention_layers(snap))  # decoding appends


def test_h2o_layer_keeps_heavy_hitter_from_probabilities():
    layer = H2OLayer(budget=3, recent=1)
    k = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 2).contiguous()
    layer.update(k, k)
    probs = torch.zeros(1, 2, 4, 4)  # two query heads share the one KV head
    probs[..., 1] = 1.0
    probs[0, 0, 3, 2] = 0.5
    layer.observe(probs)
    assert layer.keys[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0]  # heavy 1, then 2, recent 3
    with pytest.raises(LeanfmError, match="no attention scores"):
        layer.update(k[..., :1, :], k[..., :1, :])
        layer.update(k[..., :1, :], k[..., :1, :])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_quantized_cache_small_and_close(bits, key_axis):
    model = tiny_llama()  # head_dim 16, 40 tokens
    full, cache = DynamicCache(config=model.config), QuantizedKVCache(model, bits, 16, key_axis=key_axis)
    want = run_steps(model, full, IDS, prefill=20)
    got = run_steps(model, cache, IDS, prefill=20)
    err = (got - want).abs().max().item()
    assert err < (0.02 if bits == 8 else 0.2) * want.abs().max().item()
    # bytes per cached element: codes bits/8 + fp32 scale and zero per group of 16 (8 / 16 bytes);
    # per-channel keys leave the newest 40 % 16 = 8 tokens in fp32 until their group is complete
    per_elem = bits / 8 + 8 / 16
    key_bytes = per_elem if key_axis == "token" else (32 * per_elem + 8 * 4) / 40
    assert tensor_bytes(cache) / tensor_bytes(full) == pytest.approx((key_bytes + per_elem) / 8, rel=1e-3)
    assert cache.get_seq_length() == IDS.shape[1]


@FAMILIES
def test_generate_with_each_cache(make):
    model = make()
    caches = _policy_caches(model, budget=12) + [QuantizedKVCache(model, 4, 8)]
    for cache in caches:
        out = model.generate(IDS[:, :20], past_key_values=cache, max_new_tokens=8, do_sample=False, pad_token_id=2)
        assert out.shape == (1, 28), type(cache).__name__
        assert cache.get_seq_length() == 27
    assert all(layer.keys.shape[-2] <= 12 for layer in full_attention_layers(caches[0]))


# ---------------------------------------------------------------- configs, apply_, make_cache
def test_apply_attaches_policy_and_make_cache():
    model = tiny_llama()
    assert isinstance(make_cache(model), DynamicCache)
    leanfm.apply_(model, {"method": "streaming_llm", "budget": 16, "sinks": 2})
    step = model.leanfm_info["steps"][-1]
    assert step["simulated"] is False and "Cache" in step["kernel"] and step["budget"] == 16
    assert isinstance(make_cache(model), StreamingLLMCache)
    leanfm.apply_(model, H2OConfig(budget=16, recent_ratio=0.25))
    assert model.config._attn_implementation == "eager" and model.leanfm_info["steps"][-1]["replaces"] == "streaming_llm"
    cache = make_cache(model)
    assert isinstance(cache, H2OCache) and cache.layers[0].recent == 4
    leanfm.apply_(model, KVQuantConfig(bits=4, group_size=16))
    assert isinstance(make_cache(model), QuantizedKVCache)


@pytest.mark.parametrize("step, match", [
    ({"method": "streaming_llm", "budget": 4, "sinks": 4}, "smaller than sinks"),
    ({"method": "streaming_llm", "budget": 0, "sinks": 0}, "budget=0"),
    ({"method": "snapkv", "window": 0}, "window=0"),
    ({"method": "snapkv", "budget": 16, "window": 16}, "smaller than the cache budget"),
    ({"method": "snapkv", "kernel": 4}, "odd"),
    ({"method": "h2o", "recent_ratio": 0.0}, r"\(0, 1\]"),
    ({"method": "h2o", "recent_ratio": 1.5}, r"\(0, 1\]"),
    ({"method": "kv_quant", "bits": 3}, "use 4 or 8"),
    ({"method": "kv_quant", "key_axis": "head"}, "'token' or 'channel'"),
])
def test_bad_parameters_one_line_error(step, match):
    with pytest.raises(LeanfmError, match=match) as e:
        config_from_dict(step)
    assert "\n" not in str(e.value)


def test_group_size_must_divide_head_dim():
    with pytest.raises(LeanfmError, match="does not divide the head dimension 16"):
        leanfm.apply_(tiny_llama(), KVQuantConfig(bits=8, group_size=12))


# ---------------------------------------------------------------- long-context evaluation
def test_stream_perplexity_full_budget_equals_full_cache_and_one_forward():
    model = tiny_llama()
    ids = IDS[0]
    full = stream_perplexity(model, ids, lambda: DynamicCache(config=model.config))
    big = stream_perplexity(model, ids, StreamingLLMConfig(budget=64, sinks=4), chunk=1)
    assert big["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert big["eval_tokens"] == full["eval_tokens"] == ids.numel() - 1
    logits = model(IDS, use_cache=False).logits[0, :-1]
    one = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert full["perplexity"] == pytest.approx(one, rel=1e-4)
    small = stream_perplexity(model, ids, StreamingLLMConfig(budget=8, sinks=2), chunk=4)
    assert small["kv_cache_bytes"] < 0.5 * full["kv_cache_bytes"]
    assert small["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)


def test_passkey_harness_runs_and_hides_key():
    tok, model = tiny_tokenizer(), tiny_llama(vocab=300)
    prompt = passkey_prompt(tok, 300, "12345", 0.5, bos=False)
    assert abs(prompt.numel() - 300) <= 2 and "12345" in tok.decode(prompt)
    res = passkey_accuracy(model, tok, StreamingLLMConfig(budget=32, sinks=4), context_lengths=[200, 300], trials=2,
                           prefill_chunk=16, new_tokens=3)
    assert set(res["accuracy"]) == {200, 300} and all(0 <= a <= 1 for a in res["accuracy"].values())
    assert abs(res["prompt_tokens"][300] - 300) <= 2


def test_sliding_window_perplexity_matches_bounded_forwards():
    """stride 1 = every target predicted from exactly min(t, window) preceding tokens; a window
    covering the whole text equals one full forward; stride > 1 scores each token once."""
    from leanfm.measure.long_context import sliding_window_perplexity

    model, ids = tiny_llama(), IDS[0, :30]
    nll = 0.0
    for t in range(1, 30):
        ctx = ids[max(0, t - 8): t]
        nll += torch.nn.functional.cross_entropy(model(ctx[None]).logits[0, -1:], ids[t: t + 1]).item()
    got = sliding_window_perplexity(model, ids, window=8, stride=1)
    assert got["eval_tokens"] == 29 and got["nll_per_token"] == pytest.approx(nll / 29, rel=1e-5)
    full = stream_perplexity(model, ids, None, chunk=30)
    assert sliding_window_perplexity(model, ids, window=64, stride=5)["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert sliding_window_perplexity(model, ids, window=8, stride=3)["eval_tokens"] == 29
    with pytest.raises(LeanfmError, match="stride"):
        sliding_window_perplexity(model, ids, window=8, stride=9)


def test_tova_keep_matches_a_one_by_one_reference():
    """TOVA keeps the ``budget`` tokens the newest query attends to most; dropping the least
    attended one at a time (the paper's loop) gives the same set when the scores are fixed."""
    from leanfm.methods.kvcache.policy_math import tova_keep

    torch.manual_seed(0)
    scores = torch.rand(3, 20)
    got = tova_keep(scores, 12)
    for b in range(3):
        kept = list(range(20))
        while len(kept) > 12:
            kept.remove(min(kept, key=lambda i: scores[b, i].item()))
        assert got[b].tolist() == kept
    assert torch.equal(tova_keep(scores, 25), torch.arange(20).expand(3, 20))


def test_tova_layer_evicts_the_least_attended_token_for_every_head():
    from leanfm.methods.kvcache.layers import TOVALayer

    layer = TOVALayer(budget=4)
    k = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 3).contiguous()
    layer.update(k, k.clone())
    probs = torch.full((1, 4, 1, 5), 0.2)
    probs[:, :2, :, 2] = 0.0  # token 2 gets no attention from two of the four query heads
    probs[:, 2:, :, 2] = 0.1
    layer.observe(probs)
    assert layer.keys.shape == (1, 2, 4, 3)
    assert layer.keys[0, :, :, 0].tolist() == [[0.0, 1.0, 3.0, 4.0]] * 2  # same tokens kept for both KV heads
