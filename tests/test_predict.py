"""Roofline cost predictor (leanfm.predict): shapes, bytes and FLOPs against hand computations and
against the real tensors of tiny random models; recipes' effects; bad input; the CLI entry."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.predict.analyzer import expected_tokens, predict
from leanfm.predict.arch import arch_from_config, builtin_configs, load_arch
from leanfm.predict.recipe_effects import recipe_effects

from .conftest import tiny_llama

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": True}

# A memory-bound GPU-like profile with int4/int8 weight-only kernels (kernels.yaml 'gpu' entries).
GPU = {"name": "test-gpu", "kind": "gpu", "compute_capability": 9.0, "memory_gb": 80, "memory_bandwidth_gbps": 2000,
       "peak_tflops": {"fp32": 50, "bf16": 800, "fp16": 800, "int8": 1600}, "power_w": 500, "usd_per_hour": 2.0,
       "grid_gco2_per_kwh": 400, "default_dtype": "bf16"}
# A CPU profile (leanfm's own QuantLinear layouts): fp32 dense.
CPU = {"name": "test-cpu", "kind": "cpu", "memory_gb": 16, "memory_bandwidth_gbps": 20, "peak_tflops": {"fp32": 0.1},
       "power_w": 10, "usd_per_hour": 0.1, "grid_gco2_per_kwh": 400}


def _local():
    from leanfm.predict.hardware import load_hardware

    return load_hardware("local", calibrated=False)  # nominal rates; kernels.yaml 'local' entries


def _llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
              vocab_size=100, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(over)
    return LlamaConfig(**kw)


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_hand_computed_and_equal_to_measure():
    from transformers import LlamaForCausalLM

    from leanfm.measure.flops import flops_per_token

    prompt, gen = 10, 5
    context = prompt + (gen + 1) / 2  # 13 keys: the mean decode context (measure/flops.py convention)
    head_dim = 64 // 4
    per_layer = 2 * (64 * 64 + 64 * 2 * head_dim + 64 * 2 * head_dim + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64)
    assert per_layer == 73728
    linear = 2 * per_layer + 2 * 64 * 100  # two layers + LM head (tied, still a matmul per token)
    attention = 2 * 4 * 4 * head_dim * context  # layers x (QK^T + AV = 4 x heads x head_dim x context)
    hand = linear + attention
    assert hand == 160256 + 6656
    r = predict(TINY, "baseline", CPU, prompt=prompt, gen=gen)
    assert r["flops_per_token"] == pytest.approx(hand, rel=1e-12)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    assert flops_per_token(model, context) == pytest.approx(hand, rel=1e-12)


def test_prefill_attention_flops_are_causal():
    r = predict(TINY, "baseline", CPU, prompt=8, gen=1)
    qk = [row for row in r["per_layer"]["prefill"] if row["op"] == "attn_qk"][0]
    assert qk["flops"] == 2 * 4 * 16 * (8 * 9 / 2)  # sum over query positions j of j keys


# ---------------------------------------------------------------- KV cache


def _kv_tensor_bytes(cache) -> int:
    """Bytes of the cached keys and values themselves (not helper tables a cache may hold)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _generate_cache(model, prompt: int, new: int, batch: int = 1, cache=None):
    ids = torch.randint(3, 100, (batch, prompt))
    kw = {} if cache is None else {"past_key_values": cache}
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2,
                         return_dict_in_generate=True, **kw)
    return out.past_key_values


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_bytes_equal_real_dynamic_cache(batch):
    from transformers import LlamaForCausalLM

    from leanfm.measure.memory import tensor_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    cache = _generate_cache(model, prompt=12, new=6, batch=batch)
    # generate feeds prompt + new - 1 tokens through the model (the last one is never fed back)
    r = predict(TINY, "baseline", CPU, batch=batch, prompt=12, gen=5)
    assert r["kv_cache_bytes"] == tensor_bytes(cache)


def test_kv_bytes_equal_real_streaming_llm_cache():
    from transformers import LlamaForCausalLM

    from leanfm.methods.kvcache.policies import StreamingLLMConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    cfg = StreamingLLMConfig(budget=10, sinks=2)
    cache = _generate_cache(model, prompt=8, new=9, cache=cfg.make_cache(model))  # 16 tokens seen > budget
    r = predict(TINY, [{"method": "streaming_llm", "budget": 10, "sinks": 2}], CPU, prompt=8, gen=8)
    assert r["kv_cache_bytes"] == _kv_tensor_bytes(cache) == 2 * 2 * 2 * 16 * 10 * 4  # layers x K,V x kv heads x dim x budget x fp32


def test_kv_bytes_equal_real_quantized_cache():
    from transformers import LlamaForCausalLM

    from leanfm.measure.memory import tensor_bytes
    from leanfm.methods.kvcache.policies import KVQuantConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    for bits, group in ((8, 8), (4, None)):
        cache = _generate_cache(model, prompt=9, new=4, cache=KVQuantConfig(bits=bits, group_size=group).make_cache(model))
        r = predict(TINY, [{"method": "kv_quant", "bits": bits, "group_size": group}], CPU, prompt=9, gen=3)
        assert r["kv_cache_bytes"] == tensor_bytes(cache)


def test_kv_bytes_sliding_window_layers_equal_real_cache():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from leanfm.measure.memory import tensor_bytes

    kw = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=96,
              vocab_size=100, sliding_window=5, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
              max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()
    cache = _generate_cache(model, prompt=7, new=5)
    cache_bytes = _kv_tensor_bytes(cache)
    r = predict({"model_type": "gemma3_text", **kw, "tie_word_embeddings": True}, "baseline", CPU, prompt=7, gen=4)
    assert r["kv_cache_bytes"] == cache_bytes == 2 * 1 * 32 * 4 * (4 + 4 + 11)  # sliding layers keep window - 1
    assert tensor_bytes(cache) >= cache_bytes


# ---------------------------------------------------------------- weight bytes


W4G64 = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}
EXTRA_STEPS = {  # int4-fast without its GPTQ calibration; embed_quant sharing the tied head, or beside a packed one
    "int4-fast": [W4G64, {**W4G64, "only": ["lm_head"], "skip": []}],
    "w4g64+emb8": [W4G64, {"method": "embed_quant", "bits": 8}],
    "emb4g32": [{"method": "embed_quant", "bits": 4, "group_size": 32, "symmetric": False}],
    "int4-fast+emb8": [W4G64, {**W4G64, "only": ["lm_head"], "skip": []}, {"method": "embed_quant", "bits": 8}],
}


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "rtn-w8", *EXTRA_STEPS])
def test_weight_bytes_equal_packed_model(recipe):
    from leanfm.measure.memory import weight_bytes
    from leanfm.measure.bandwidth import decode_weight_bytes

    if recipe in EXTRA_STEPS:
        steps = EXTRA_STEPS[recipe]
    else:
        steps = [s.to_dict() for s in leanfm.load_recipe(recipe).steps]
    model = tiny_llama(hidden=128, inter=256, vocab=320)
    for s in steps:
        leanfm.apply_(model, s)
    cfg = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 256, "vocab_size": 320, "tie_word_embeddings": True}
    r = predict(cfg, steps, _local())
    assert r["decode_weight_bytes"] == decode_weight_bytes(model)
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    assert r["weight_bytes"] == weight_bytes(model) - rotary  # all weights; RoPE tables are not weights


def test_leanfm_layout_bytes_equal_quantlinear_buffers():
    from leanfm.kernels import backends
    from leanfm.kernels.qlinear import QuantLinear
    from leanfm.methods.quantize.grid import rtn_quantize
    from leanfm.predict.formats import leanfm_quant_bytes
    from leanfm.predict.recipe_effects import QuantSpec

    torch.manual_seed(0)
    w = torch.randn(64, 576)
    cases = [(4, 64, False, "tinygemm-int4"), (4, None, True, "tinygemm-int4"), (3, 96, False, "reference"),
             (8, None, True, "int8pack"), (8, 64, False, "reference"), (4, 64, False, "cpp-int4")]
    for bits, group, sym, be in cases:
        if be == "cpp-int4" and backends.BACKENDS[be].unsupported(backends.Layout(bits, group, 576, 64), sym):
            continue  # no compiler here
        q = QuantLinear(rtn_quantize(w, bits, group, sym), None, be)
        held = sum(t.numel() * t.element_size() for t in q.buffers())
        assert leanfm_quant_bytes(QuantSpec("rtn", bits, group, sym), 576, 64, be) == held, (bits, group, sym, be)


def test_export_layout_bytes_equal_compressed_tensors_export():
    from leanfm.kernels.export_ct import compress_weight, scheme_of
    from leanfm.methods.quantize.grid import rtn_quantize
    from leanfm.predict.formats import export_quant_bytes
    from leanfm.predict.recipe_effects import QuantSpec

    torch.manual_seed(0)
    w = torch.randn(96, 256)
    for bits, group, sym in ((4, 64, False), (4, None, True), (8, 128, False)):
        qw = rtn_quantize(w, bits, group, sym)
        tensors = compress_weight(qw, scheme_of(qw))
        as_loaded = sum(t.numel() * (2 if k == "weight_scale" else t.element_size()) for k, t in tensors.items())  # bf16 scales
        assert export_quant_bytes(QuantSpec("rtn", bits, group, sym), 256, 96) == as_loaded


# ---------------------------------------------------------------- recipes and effects


def test_targets_follow_methods_targets():
    from leanfm.methods.targets import iter_linears

    model = tiny_llama()
    eff = recipe_effects("int4-fast")
    names = [n for n, _ in model.named_modules() if n.endswith(("_proj", "lm_head"))]
    for rule, (skip, only) in zip(eff.rules, ((("lm_head",), ()), ((), ("lm_head",)))):
        real = {n for n, _ in iter_linears(model, skip, only)}
        assert {n for n in names if rule.targets(n)} == real
    pieces = eff.pieces("lm_head", 64, 300, tied=True)
    assert pieces[0].quant is not None and pieces[0].packed  # int4-fast quantizes the head, other recipes skip it
    assert recipe_effects("rtn-w4g64").pieces("lm_head", 64, 300)[0].quant is None


def test_effects_of_builtin_recipes_equal_the_snapshot_of_the_predictor_before_declarations():
    """Each method's ``effect`` reproduces what the predictor's old per-method chain recorded
    (snapshot taken from that code at commit f4f0fbd, for every built-in recipe and four compositions)."""
    snap = json.loads((Path(__file__).parent / "data" / "effects_snapshot.json").read_text())
    later = (", row_local=False", ", per_layer=False", ", embed=None", ", neutral=[]")  # fields added since (embed_quant, tuning), at their defaults: no effect
    for name, want in snap.items():
        got = repr(recipe_effects(name))
        for field in later:
            got = got.replace(field, "")
        assert got == want, name


def test_structure_and_lowrank_effects():
    arch = load_arch("llama-2-7b")
    a = recipe_effects("layerdrop25").structure(arch)
    assert a.layers == 32 - 8
    w = recipe_effects("width25").structure(arch)
    assert w.intermediate == 11008 - 2752 and w.heads == 32
    pcs = recipe_effects("svd70").pieces("model.layers.0.mlp.up_proj", 4096, 11008)
    r = int(0.7 * 4096 * 11008 / (4096 + 11008))
    assert [(p.in_features, p.out_features) for p in pcs] == [(4096, r), (r, 11008)]
    svd = predict("llama-2-7b", "svd70", GPU)
    base = predict("llama-2-7b", "baseline", GPU)
    assert svd["weight_bytes"] < base["weight_bytes"] and svd["speedup_vs_baseline"]["decode"] > 1


# ---------------------------------------------------------------- predictions


def test_throughput_non_decreasing_while_memory_bound_and_stops_at_fit():
    r = predict("llama-2-70b", "gptq-w4g128", GPU, prompt=1024, gen=256)
    curve = r["throughput_vs_batch"]
    mem = [c for c in curve if c["bound"] == "memory" and c["fits"]]
    assert len(mem) >= 3
    assert all(b["decode_tokens_per_s"] >= a["decode_tokens_per_s"] for a, b in zip(mem, mem[1:]))
    assert all(c["fits"] for c in curve[:-1])
    assert curve[-1]["batch"] == 256 or not curve[-1]["fits"]


def test_int4_on_memory_bound_hardware_speeds_up_decode():
    r = predict("llama-3.1-8b", "rtn-w4g64", GPU, batch=1, prompt=512, gen=128)
    assert r["bound"]["decode"] == "memory"
    assert r["speedup_vs_baseline"]["decode"] > 2
    assert r["will_speed_up"] and "int4" in r["will_speed_up_reason"] and "memory-bound" in r["will_speed_up_reason"]
    assert not r["simulated"]
    # decode time follows the bytes a step reads (bandwidth term), plus the kernel's dequant overhead
    assert r["tpot_ms"] == pytest.approx(r["decode_bytes_per_step"] / 2000e9 * 1e3 * 1.1, rel=0.05)


def test_masked_sparsity_predicts_no_speedup_and_says_simulated():
    for recipe in ("wanda-2:4", "magnitude50"):
        r = predict("llama-3.1-8b", recipe, GPU)
        assert r["speedup_vs_baseline"]["decode"] == pytest.approx(1.0)
        assert r["speedup_vs_baseline"]["prefill"] == pytest.approx(1.0)
        assert not r["will_speed_up"] and "simulated" in r["will_speed_up_reason"] and r["simulated"]


def test_format_without_kernel_is_simulated():
    r = predict("llama-3.1-8b", "rtn-w4g64", {**GPU, "kind": "sbc", "name": "no-kernels"})
    assert r["simulated"] and not r["will_speed_up"] and "has no kernel on no-kernels" in r["will_speed_up_reason"]
    assert r["weight_bytes"] == predict("llama-3.1-8b", "baseline", {**GPU, "kind": "sbc", "name": "no-kernels"})["weight_bytes"]


def test_speculative_decoding_math():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    steps = [{"method": "speculative", "draft": "self", "k": 4, "skip_fraction": 0.5}]
    r = predict("llama-2-7b", steps, GPU, acceptance_rate=0.8)
    s = r["speculative"]
    assert s["round_ms"] == pytest.approx(4 * s["draft_step_ms"] + s["verify_ms"])
    assert r["tpot_ms"] == pytest.approx(s["round_ms"] / s["tokens_per_round"])
    assert s["draft_step_ms"] < r["decode_step_ms"] < s["verify_ms"]
    assert r["speedup_vs_baseline"]["decode"] > 1.0  # 3.36 tokens per round for ~3 steps of work
    assumed = predict("llama-2-7b", steps, GPU)
    assert any("ASSUMED" in a for a in assumed["assumptions"])


def test_overheads_from_profile_are_added():
    plain = predict(TINY, "baseline", CPU)
    slow = predict(TINY, "baseline", {**CPU, "overhead_us_per_layer": 100.0, "overhead_us_per_model_step": 50.0})
    assert slow["tpot_ms"] - plain["tpot_ms"] == pytest.approx((2 * 100 + 50) / 1e3)


def test_cost_energy_and_memory_fields():
    r = predict("llama-3.1-70b", "baseline", GPU, prompt=1024, gen=256)
    assert r["weight_bytes"] == pytest.approx(r["architecture"]["params"] * 2)
    assert r["kv_cache_bytes"] == 2 * 80 * 8 * 128 * (1024 + 256) * 2
    assert not r["fits"] and "does NOT fit" in r["fits_text"]  # 141 GB of bf16 weights on an 80 GB card
    json.dumps(r)
    r = predict("llama-3.1-70b", "baseline", {**GPU, "memory_gb": 200}, prompt=1024, gen=256)  # the same setup, fitting
    assert r["fits"]
    assert r["energy_j_per_token"] == pytest.approx(500 * r["tpot_ms"] / 1e3)
    assert r["usd_per_million_tokens"] == pytest.approx(2.0 / 3600 / r["decode_tokens_per_s"] * 1e6)
    assert r["co2_g_per_million_tokens"] == pytest.approx(r["energy_j_per_token"] * 1e6 / 3.6e6 * 400)
    json.dumps(r)


# ---------------------------------------------------------------- does not fit: no verdict, no cost


@pytest.mark.parametrize("model,recipe,hardware", [
    ("llama-3.1-70b", "baseline", "raspberry-pi-5"),
    ("llama-3.1-70b", "gptq-w4g128", "raspberry-pi-5"),  # ~44 GB of int4 weights on an 8 GB board: "WILL speed up" before
    ("llama-3.1-70b", "rtn-w4g64", "pi5"),
    ("llama-3.1-70b", "baseline", "h100"),
])
def test_setup_that_does_not_fit_gets_no_verdict_nor_cost(model, recipe, hardware):
    from leanfm.predict.cli_predict import render
    from leanfm.predict.hardware import load_hardware
    from leanfm.predict.versus import prediction_for_run

    r = predict(model, recipe, hardware)
    hw = load_hardware(hardware)
    assert not r["fits"] and r["memory_total_bytes"] > hw["memory_gb"] * 1e9
    for key in ("will_speed_up", "energy_j_per_token", "usd_per_million_tokens", "co2_g_per_million_tokens"):
        assert key in r and r[key] is None, key  # keys kept for consumers, values null
    need = f"needs {r['memory_total_bytes'] / 1e9:.1f} GB, {hw['name']} has {hw['memory_gb']:g} GB"
    assert r["will_speed_up_reason"] == r["no_verdict_reason"]
    assert r["no_verdict_reason"].startswith(f"does NOT fit: {need} — no speed verdict or cost")
    assert "smaller model" in r["no_verdict_reason"] and "lower-bit recipe" in r["no_verdict_reason"]
    assert r["speedup_vs_baseline"]["decode"] > 0 and r["decode_tokens_per_s"] > 0  # what-if numbers stay
    json.loads(json.dumps(r))
    text = render(r)
    assert "WILL speed up" not in text and "will NOT speed up" not in text and "J/token" not in text and "per 1M tokens" not in text
    assert f"does NOT fit: {need}" in text and "no speed verdict or cost" in text
    # bench's compact prediction keeps its keys (versus.py) and records the null verdict
    pred = prediction_for_run(model, recipe, 1, 128, 32, 2, hardware=hardware)
    assert "error" not in pred and pred["will_speed_up"] is None and "does NOT fit" in pred["will_speed_up_reason"]
    assert pred["fits"] is False and pred["decode_tokens_per_s"] > 0


def test_fitting_setup_keeps_verdict_and_cost():
    from leanfm.predict.cli_predict import render

    r = predict("llama-3.1-8b", "rtn-w4g64", "h100")
    assert r["fits"] and r["will_speed_up"] is True and r["no_verdict_reason"] is None
    assert r["energy_j_per_token"] > 0 and r["usd_per_million_tokens"] > 0 and r["co2_g_per_million_tokens"] > 0
    text = render(r)
    assert "WILL speed up" in text and "J/token" in text and "does NOT fit" not in text


def test_compressed_fits_where_the_baseline_does_not_says_so():
    r = predict("llama-3.1-70b", "gptq-w4g128", "h100", prompt=1024, gen=256)  # ~40 GB of int4 vs 141 GB bf16 on 80 GB
    assert r["fits"] and r["will_speed_up"] is not None
    assert "baseline itself does NOT fit" in r["will_speed_up_reason"]


# ---------------------------------------------------------------- context length


@pytest.mark.parametrize("prompt,gen", [(200000, 32), (8192, 1), (8000, 193)])
def test_prompt_plus_gen_beyond_context_is_refused(prompt, gen):
    with pytest.raises(LeanfmError) as e:
        predict("smollm2-135m", "baseline", "local", prompt=prompt, gen=gen)
    msg = str(e.value)
    assert "\n" not in msg and f"= {prompt + gen} tokens exceed" in msg and "context of 8192 tokens" in msg
    assert "max_position_embeddings" in msg and "--prompt" in msg


def test_prompt_plus_gen_at_the_context_is_accepted():
    assert predict("smollm2-135m", "baseline", "local", prompt=8000, gen=192)["prompt"] == 8000
    assert predict({**TINY}, "baseline", CPU, prompt=100000, gen=1)["prompt"] == 100000  # no max_position_embeddings: unchecked
    with pytest.raises(LeanfmError, match="context of 64 tokens"):
        predict({**TINY, "max_position_embeddings": 64}, "baseline", CPU, prompt=60, gen=5)


def test_speculative_draft_context_is_checked():
    short = {**TINY, "max_position_embeddings": 16}
    steps = [{"method": "speculative", "draft": "DRAFT", "k": 2}]
    from leanfm.predict import analyzer

    real = analyzer.load_arch

    def fake(model):
        return real(short) if model == "DRAFT" else real(model)

    import unittest.mock as mock

    with mock.patch.object(analyzer, "load_arch", fake):
        with pytest.raises(LeanfmError, match="the draft model .*context of 16 tokens"):
            predict({**TINY, "max_position_embeddings": 4096}, steps, CPU, prompt=32, gen=8)


def test_builtin_configs_have_published_parameter_counts():
    published = {"llama-2-7b": 6.738e9, "llama-2-70b": 68.977e9, "llama-3.1-8b": 8.030e9, "llama-3.1-70b": 70.554e9,
                 "mistral-7b-v0.1": 7.242e9, "qwen2.5-72b": 72.706e9, "smollm2-135m": 134.5e6, "gemma3-270m": 268.1e6}
    for name, n in published.items():
        assert load_arch(name).params() == pytest.approx(n, rel=0.003), name


def test_every_model_alias_resolves_without_weights():
    from leanfm.models.registry import ALIASES

    lms = {a for a, s in ALIASES.items() if s.family == "causal-lm"}
    assert lms <= set(builtin_configs())
    for alias in lms:
        assert load_arch(alias).layers > 0


def test_a_vision_model_is_refused_by_the_lm_predictor_in_one_line():
    cfg = {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
           "intermediate_size": 1536, "vocab_size": 1}
    with pytest.raises(LeanfmError, match="is a vit model .*this roofline prices causal LMs; pass the model's folder or alias "
                                          "to leanfm predict, which prices a ViT per image"):
        load_arch(cfg)


# ---------------------------------------------------------------- bad input


def test_unknown_hardware_lists_known_ones():
    with pytest.raises(LeanfmError, match=r"unknown hardware 'tpu9'.*h100-sxm.*local"):
        predict(TINY, "baseline", "tpu9")


def test_config_missing_field_is_named():
    cfg = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    with pytest.raises(LeanfmError, match="lacks 'intermediate_size'"):
        predict(cfg, "baseline", CPU)
    with pytest.raises(LeanfmError, match="num_key_value_heads"):
        arch_from_config({**TINY, "num_key_value_heads": 3})
    with pytest.raises(LeanfmError, match="mixture of experts"):
        arch_from_config({**TINY, "num_local_experts": 8})


def test_format_the_hardware_lacks_is_one_line_error():
    # the profile claims a w8a8 kernel but has no int8 rate
    prof = {**GPU, "peak_tflops": {"fp32": 50, "bf16": 800, "fp16": 800}, "kernels": {"w8a8": {"compute_dtype": "int8"}}}
    with pytest.raises(LeanfmError, match="has no int8 math") as e:
        predict("llama-2-7b", "smoothquant-w8a8", prof)
    assert "\n" not in str(e.value)
    with pytest.raises(LeanfmError, match="default_dtype 'fp8'"):
        predict(TINY, "baseline", {**GPU, "default_dtype": "fp8"})


def test_unknown_model_says_how_to_fix():
    with pytest.raises(LeanfmError, match=r"unknown model 'not-a-model'.*config\.json") as e:
        predict("not-a-model", "baseline", CPU)
    assert "\n" not in str(e.value)


def test_bad_numbers_and_recipes():
    with pytest.raises(LeanfmError, match="batch must be a positive integer"):
        predict(TINY, "baseline", CPU, batch=0)
    with pytest.raises(LeanfmError, match="acceptance rate"):
        predict(TINY, "baseline", CPU, acceptance_rate=1.5)
    with pytest.raises(LeanfmError, match="unknown recipe"):
        predict(TINY, "no-such-recipe", CPU)


@pytest.mark.parametrize("args,needle", [
    (["--batch", "0"], "batch must be a positive integer"),
    (["--batch", "-4"], "batch must be a positive integer"),
    (["--prompt", "0"], "prompt must be a positive integer"),
    (["--gen", "-1"], "gen must be a positive integer"),
    (["--gen", "0"], "gen must be a positive integer"),
    (["--acceptance-rate", "1.5"], "acceptance rate 1.5 must be a number in [0, 1]"),
    (["--acceptance-rate", "-0.1"], "acceptance rate -0.1 must be a number in [0, 1]"),
    (["--acceptance-rate", "nan"], "acceptance rate nan"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--prompt", "200000"], "exceed smollm2-135m's context of 8192 tokens"),
    (["--hardware", "tpu9"], "unknown hardware 'tpu9'"),
    (["--batch", "two"], "invalid int value"),
])
def test_cli_bad_numbers_are_one_line_errors(args, needle, capsys):
    from leanfm.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's own errors exit from inside parse_args
        raise SystemExit(main(["predict", "--model", "smollm2-135m", *args]))
    assert e.value.code == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith("leanfm") and "error:" in err and needle in err and "\n" not in err and "Traceback" not in err
    assert out.out == ""  # nothing computed, nothing printed


# ---------------------------------------------------------------- CLI entry


def test_cli_predict_prints_table_and_writes_json(tmp_path, capsys):
    from leanfm.predict.cli_predict import main

    out = tmp_path / "p.json"
    assert main(["--model", "llama-3.1-70b", "--recipe", "gptq-w4g128", "--hardware", "h100", "--prompt", "1024", "--gen", "256",
                 "--per-layer", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fits on one h100-sxm (80 GB)" in text and "WILL speed up" in text and "attn_qk" in text
    data = json.loads(out.read_text())
    assert data["speedup_vs_baseline"]["decode"] > 2 and data["per_layer"]["decode"]
    assert main(["--model", "nope", "--hardware", "h100"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["/proc/nope/x.json", "/proc/version", "{tmp}", "{tmp}/file.txt/x.json", ""])
def test_cli_unwritable_json_fails_before_computing(target, tmp_path, capsys, monkeypatch):
    from leanfm.cli import main
    from leanfm.predict import cli_predict

    (tmp_path / "file.txt").write_text("a file, not a directory")
    called = []
    monkeypatch.setattr("leanfm.predict.analyzer.predict", lambda *a, **k: called.append(1))
    path = target.format(tmp=tmp_path)
    assert main(["predict", "--model", "smollm2-135m", "--json", path]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith("leanfm: error:") and "--json" in err and "\n" not in err and "internal error" not in err
    assert path in err or not path
    assert out.out == "" and not called  # refused before any prediction was computed or printed
    with pytest.raises(LeanfmError):
        cli_predict.check_output_path(path)


def test_cli_json_is_written_atomically_into_new_directories(tmp_path, capsys):
    from leanfm.cli import main

    out = tmp_path / "a" / "b" / "p.json"
    assert main(["predict", "--model", "smollm2-135m", "--hardware", "h100", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and json.loads(out.read_text())["hardware"] == "h100-sxm"
    assert [p.name for p in out.parent.iterdir()] == ["p.json"]  # no temporary file left behind
    out.write_text("old")
    assert main(["predict", "--model", "smollm2-135m", "--json", str(out)]) == 0  # an existing file is replaced
    assert json.loads(out.read_text())["model"] == "smollm2-135m"


def test_failed_json_write_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
    from leanfm.predict import cli_predict

    out = tmp_path / "p.json"
    out.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_predict.os, "replace", boom)
    with pytest.raises(LeanfmError, match="cannot write --json .*No space left on device"):
        cli_predict.write_json_atomic({"a": 1}, out)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]


@pytest.mark.parametrize("asked,resolved", [("h100", "h100-sxm"), ("pi5", "raspberry-pi-5"), ("A100", "a100-80gb")])
def test_alias_resolution_is_shown(asked, resolved, capsys):
    from leanfm.predict.cli_predict import main

    r = predict(TINY, "baseline", asked)
    assert r["hardware"] == resolved and r["hardware_requested"] == asked
    assert main(["--model", "smollm2-135m", "--hardware", asked]) == 0
    assert f"hardware   {resolved} (you asked for '{asked}')" in capsys.readouterr().out


@pytest.mark.parametrize("asked", ["h100-sxm", "H100-SXM", "local"])
def test_canonical_name_is_not_annotated(asked, capsys):
    from leanfm.predict.cli_predict import main

    assert predict(TINY, "baseline", asked)["hardware_requested"] is None
    assert main(["--model", "smollm2-135m", "--hardware", asked]) == 0
    assert "you asked for" not in capsys.readouterr().out


def test_dtype_the_hardware_lacks_is_one_line_error(capsys):
    """fp8 on this CPU: the local profile has no fp8 rate (the issue's example)."""
    with pytest.raises(LeanfmError, match=r"local.* no fp8 math.*has: fp32") as e:
        predict("smollm2-135m", "baseline", "local", dtype="fp8")
    assert "\n" not in str(e.value)
    from leanfm.cli import main

    assert main(["predict", "--model", "smollm2-135m", "--hardware", "local", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanfm: error:") and "fp8" in err and "\n" not in err
    assert predict("llama-2-7b", "baseline", "h100", dtype="fp8")["dtype"] == "fp8"  # the H100 has fp8


def test_measured_curves_interpolate_and_clamp():
    from leanfm.predict.curves import gemv_seconds, rate_for_rows

    grid = {"in_features": [512, 2048], "mib": [1, 16], "gbps": [[10.0, 12.0], [16.0, 20.0]]}
    t = gemv_seconds(grid)
    mib = 2**20
    assert t(mib, 512) == pytest.approx(mib / 10e9)  # a grid point
    assert t(4 * mib, 1024) == pytest.approx(4 * mib / 14.5e9)  # halfway in log(in) and log(bytes)
    assert t(64 * mib, 8192) == pytest.approx(64 * mib / 20e9)  # clamped at the corner
    r = rate_for_rows([[8, 20e9], [128, 100e9]])
    assert r(1) == 20e9 and r(4096) == 100e9
    assert r(32) == pytest.approx(20e9 + 80e9 * 0.5)  # halfway in log(rows)


def test_batched_dense_matmuls_read_slower_by_the_measured_factor():
    """With ``gemm_dram_slowdown`` a dense matmul of 4 rows costs the factor times its one-row
    read; batch 1 is untouched. ``kv_append`` (eager's concatenating cache) appears only when
    elementwise ops are unfused and grows with the cache."""
    curves = {**CPU, "gemv_grid": {"in_features": [64], "mib": [1], "gbps": [[0.01]]}}  # slow reads: matmuls memory-bound
    slowed = {**curves, "gemm_dram_slowdown": [[1, 1.0], [4, 3.0]]}

    def matmul_ms(p, batch):
        rows = predict(TINY, "baseline", p, batch=batch, prompt=64, gen=8)["per_layer"]["decode"]
        return sum(r["time_ms"] * r["count"] for r in rows if r["op"].startswith(("q_proj", "up_proj")) and r["layers"] != "head")

    assert matmul_ms(slowed, 1) == pytest.approx(matmul_ms(curves, 1))
    assert matmul_ms(slowed, 4) == pytest.approx(3.0 * matmul_ms(curves, 4), rel=0.02)
    ops = lambda p, prompt: {r["op"]: r for r in predict(TINY, "baseline", p, prompt=prompt, gen=8)["per_layer"]["decode"]}  # noqa: E731
    assert "kv_append" not in ops(CPU, 64)
    unfused = {**CPU, "elementwise": "unfused"}
    short, long = ops(unfused, 64)["kv_append"], ops(unfused, 512)["kv_append"]
    assert long["bytes"] > 4 * short["bytes"] > 0


def test_calibrated_curves_replace_flat_roofline():
    """A profile with measured curves prices a one-row matmul at the bandwidth of its shape and
    prefill matmuls at the rate for their row count; without curves the flat roofline is used."""
    flat = predict(TINY, "baseline", CPU, prompt=64, gen=8)
    slow = {**CPU, "gemv_grid": {"in_features": [64], "mib": [1], "gbps": [[0.001]]}, "gemm_fp32_curve": [[1, 1e6], [4096, 1e6]]}
    got = predict(TINY, "baseline", slow, prompt=64, gen=8)
    assert got["tpot_ms"] > flat["tpot_ms"] * 10 and got["prefill_ms"] > flat["prefill_ms"] * 10
