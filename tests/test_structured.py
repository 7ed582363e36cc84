"""Structured pruning: ShortGPT layer dropping and width (head-group / MLP-channel) pruning."""
from __future__ import annotations

import copy

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.methods.layers import decoder_layers
from leanfm.methods.structured.layerdrop import block_influence, lowest_influence, measure_block_influence, remove_layers
from leanfm.methods.structured.width import prune_attention_groups, prune_mlp_channels, set_config_sizes
from leanfm.methods.structured.width_math import group_rows, keep_top, kv_group_importance, mlp_channel_importance
from leanfm.recipe import load_recipe
from tests.conftest import tiny_gemma3, tiny_llama

CALIB = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
PROMPT = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(1))  # longer than Gemma3's window of 8


def gemma3_gqa(layers: int = 3, seed: int = 0):
    """Gemma3 with 2 key/value groups of 2 query heads, so whole groups can be pruned."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=96, vocab_size=300, max_position_embeddings=512, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers],
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


def llama_bias(seed: int = 0):
    """Llama with q/k/v/o and MLP biases and 4 groups of 2 heads (exercises bias slicing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
                      vocab_size=300, max_position_embeddings=512, attention_bias=True, mlp_bias=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_generates_with_cache(model):
    with torch.no_grad():
        cached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True)
        plain = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == PROMPT.shape[1] + 8 and torch.equal(cached, plain)


def assert_reloads(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.allclose(logits(again), logits(model), atol=1e-5, rtol=1e-5)
    return again


# ---- layer drop: math ---------------------------------------------------------------------

def test_block_influence_on_hand_made_hidden_states():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, 3 * x) == pytest.approx(0.0, abs=1e-12)  # same direction: no influence
    assert block_influence(x, -x) == pytest.approx(2.0)
    e0, e1 = torch.eye(8)[0].expand(4, 8), torch.eye(8)[1].expand(4, 8)
    assert block_influence(e0, e1) == pytest.approx(1.0)  # orthogonal
    half_in, half_out = torch.cat([e0, e0]), torch.cat([e0, e1])  # half the tokens unchanged, half rotated 90 degrees
    assert block_influence(half_in, half_out) == pytest.approx(0.5)


def test_lowest_influence_picks_the_smallest_and_refuses_dropping_all():
    assert lowest_influence([0.5, 0.1, 0.3, 0.1], 2) == [1, 3]
    assert lowest_influence([0.5, 0.1, 0.3, 0.1], 3) == [1, 2, 3]
    with pytest.raises(LeanfmError, match="keep at least one"):
        lowest_influence([0.5, 0.1], 2)


def test_measured_block_influence_matches_the_models_hidden_states():
    model = tiny_llama(layers=4)
    bi = measure_block_influence(model, CALIB)
    with torch.no_grad():
        hs = model(input_ids=CALIB, output_hidden_states=True).hidden_states  # the last one is after the final norm
    for i in range(3):
        assert bi[i] == pytest.approx(block_influence(hs[i], hs[i + 1]), abs=1e-5)


# ---- layer drop: model --------------------------------------------------------------------

@pytest.mark.parametrize("make,n_layers", [(tiny_llama, 4), (tiny_gemma3, 3)], ids=["llama", "gemma3"])
def test_layerdrop_removes_lowest_influence_layers_and_reloads(make, n_layers, tmp_path):
    model = make(layers=n_layers)
    bi = measure_block_influence(model, CALIB)
    leanfm.apply_(model, {"method": "layerdrop", "count": 1}, calib=CALIB)
    step = model.leanfm_info["steps"][-1]
    assert step["simulated"] is False and step["kernel"] == "dense fp32 (layers removed)"
    assert step["dropped_layers"] == [min(range(n_layers), key=lambda i: bi[i])]
    assert step["block_influence"] == pytest.approx(bi, abs=1e-5)
    assert step["params_after"] < step["params_before"]
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == n_layers - 1
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(n_layers - 1))
    assert_generates_with_cache(model)
    again = assert_reloads(model, tmp_path)
    assert again.config.num_hidden_layers == n_layers - 1
    if hasattr(model.config, "layer_types"):
        assert len(again.config.layer_types) == n_layers - 1


@pytest.mark.parametrize("make,drop,types", [
    (tiny_gemma3, 0, ["sliding_attention", "full_attention"]),  # truncating the list would give [sliding, sliding]
    (gemma3_gqa, 1, ["sliding_attention", "sliding_attention"]),  # ... would give [sliding, full]
], ids=["first", "middle-full"])
def test_removing_a_gemma3_layer_equals_skipping_it(make, drop, types):
    """Each remaining layer keeps its attention type (sliding window or full): the smaller model
    computes what the original does with that layer replaced by the identity."""
    model = make(layers=3)
    ref_model = copy.deepcopy(model)
    skip = decoder_layers(ref_model)[drop].register_forward_hook(lambda mod, args, out: args[0])
    ref = logits(ref_model)
    skip.remove()
    remove_layers(model, [drop])
    assert model.config.layer_types == types
    assert torch.allclose(logits(model), ref, atol=1e-5)
    assert_generates_with_cache(model)


def test_layerdrop_fraction_rounds_half_up():
    model = tiny_llama(layers=6)
    leanfm.apply_(model, {"method": "layerdrop", "fraction": 0.25}, calib=CALIB)  # 1.5 -> 2
    assert model.config.num_hidden_layers == 4 and len(model.leanfm_info["steps"][-1]["dropped_layers"]) == 2


@pytest.mark.parametrize("params,match", [
    ({"fraction": 0.0}, r"fraction=0.0 must be in \(0, 1\)"),
    ({"fraction": 1.0}, r"fraction=1.0 must be in \(0, 1\)"),
    ({"fraction": -0.2}, r"fraction=-0.2 must be in \(0, 1\)"),
    ({}, "exactly one of 'fraction'"),
    ({"fraction": 0.5, "count": 1}, "exactly one of 'fraction'"),
    ({"count": 0}, "count=0 must be >= 1"),
    ({"count": 4}, "would drop 4 of the model's 4 decoder layers"),
    ({"count": 9}, "would drop 9 of the model's 4 decoder layers"),
    ({"fraction": 0.9}, "would drop 4 of the model's 4 decoder layers"),
])
def test_layerdrop_bad_parameters(params, match):
    with pytest.raises(LeanfmError, match=match):
        leanfm.apply_(tiny_llama(layers=4), {"method": "layerdrop", **params}, calib=CALIB)


@pytest.mark.parametrize("method,params", [("layerdrop", {"count": 1}), ("width", {"mlp_fraction": 0.5})])
def test_missing_or_empty_calibration_is_refused(method, params):
    with pytest.raises(LeanfmError, match=f"method {method} needs calibration data"):
        leanfm.apply_(tiny_llama(), {"method": method, **params}, calib=None)
    with pytest.raises(LeanfmError, match="empty or missing"):
        leanfm.apply_(tiny_llama(), {"method": method, **params}, calib=torch.zeros(0, 0, dtype=torch.long))


# ---- width: math --------------------------------------------------------------------------

def test_mlp_channel_importance_is_the_norm_of_each_channels_contribution():
    x, w = torch.randn(50, 12), torch.randn(6, 12)
    imp = mlp_channel_importance(x.pow(2).sum(0), w)
    brute = torch.stack([torch.outer(x[:, j], w[:, j]).norm() for j in range(12)])
    assert torch.allclose(imp.float(), brute, rtol=1e-5)


def test_kv_group_importance_sums_the_groups_query_heads():
    head_dim, heads, groups = 2, 4, 2
    x, w = torch.randn(30, heads * head_dim), torch.randn(5, heads * head_dim)
    imp = kv_group_importance(x.pow(2).sum(0), w, head_dim, groups)
    per_head = [x[:, h * 2:(h + 1) * 2].norm() * w[:, h * 2:(h + 1) * 2].norm() for h in range(heads)]
    assert torch.allclose(imp.float(), torch.stack([per_head[0] + per_head[1], per_head[2] + per_head[3]]), rtol=1e-5)
    assert keep_top(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2).tolist() == [1, 3]  # most important, original order
    assert group_rows(torch.tensor([1]), 2, 3).tolist() == [6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("make", [tiny_llama, gemma3_gqa, llama_bias], ids=["llama", "gemma3", "llama-bias"])
def test_slicing_equals_masking_the_removed_structures(make):
    """Physically removing a KV group and MLP channels = zeroing their o_proj / down_proj columns
    (and their biases): checks the q/k/v/o and gate/up/down index bookkeeping."""
    model = make()
    masked = copy.deepcopy(model)
    cfg = model.config
    heads, kv, hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    rep, g = torch.Generator().manual_seed(3), heads // kv
    for layer, mlayer in zip(decoder_layers(model), decoder_layers(masked)):
        keep_g = torch.sort(torch.randperm(kv, generator=rep)[: kv // 2]).values
        keep_c = torch.sort(torch.randperm(inter, generator=rep)[: inter // 2]).values
        with torch.no_grad():
            drop_cols = torch.ones(heads * hd, dtype=torch.bool)
            drop_cols[group_rows(keep_g, g, hd)] = False
            mlayer.self_attn.o_proj.weight[:, drop_cols] = 0
            drop_ch = torch.ones(inter, dtype=torch.bool)
            drop_ch[keep_c] = False
            mlayer.mlp.down_proj.weight[:, drop_ch] = 0
        prune_attention_groups(layer.self_attn, keep_g, g, hd)
        prune_mlp_channels(layer.mlp, keep_c)
    set_config_sizes(model, kv // 2 * g, kv // 2, hd, inter // 2)
    assert torch.allclose(logits(model), logits(masked), atol=1e-5)


# ---- width: model -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, gemma3_gqa, llama_bias], ids=["llama", "gemma3", "llama-bias"])
def test_width_pruning_shrinks_config_and_tensors_and_reloads(make, tmp_path):
    model = make()
    cfg0 = copy.deepcopy(model.config)
    leanfm.apply_(model, {"method": "width", "heads_fraction": 0.5, "mlp_fraction": 0.25}, calib=CALIB)
    step = model.leanfm_info["steps"][-1]
    assert step["simulated"] is False and step["params_after"] < step["params_before"]
    assert step["params_after"] == sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert cfg.num_key_value_heads == cfg0.num_key_value_heads // 2
    assert cfg.num_attention_heads == cfg0.num_attention_heads // 2 and cfg.head_dim == cfg0.head_dim
    assert cfg.intermediate_size == cfg0.intermediate_size - round(0.25 * cfg0.intermediate_size)
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
        assert a.o_proj.weight.shape == (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)
        assert a.o_proj.in_features == cfg.num_attention_heads * cfg.head_dim
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
        assert m.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
        if a.q_proj.bias is not None:
            assert a.q_proj.bias.shape == (a.q_proj.out_features,) and m.up_proj.bias.shape == (cfg.intermediate_size,)
    assert_generates_with_cache(model)
    again = assert_reloads(model, tmp_path)
    assert again.config.num_key_value_heads == cfg.num_key_value_heads
    assert sum(p.numel() for p in again.parameters()) == step["params_after"]


def test_width_prunes_the_unimportant_channels():
    """A channel whose down_proj column is zero contributes nothing: it is the one removed."""
    model = tiny_llama(layers=1)
    mlp = decoder_layers(model)[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] = 0
    keep_before = mlp.down_proj.weight[:, 6].clone()
    leanfm.apply_(model, {"method": "width", "mlp_fraction": 1 / 128}, calib=CALIB)
    assert mlp.down_proj.in_features == 127 and torch.equal(mlp.down_proj.weight[:, 5], keep_before)


def test_width_on_single_kv_group_model_mlp_only_and_note():
    model = tiny_gemma3()
    leanfm.apply_(model, {"method": "width", "heads_fraction": 0.25, "mlp_fraction": 0.5}, calib=CALIB)
    step = model.leanfm_info["steps"][-1]
    assert "rounds to 0 of 1 key/value groups" in step["note"] and model.config.num_attention_heads == 4
    assert model.config.intermediate_size == 64


@pytest.mark.parametrize("make,params,match", [
    (tiny_gemma3, {"heads_fraction": 0.5}, "would remove 1 of 1 key/value groups, leaving 0"),
    (tiny_llama, {"heads_fraction": 0.75}, "would remove 2 of 2 key/value groups, leaving 0"),
    (tiny_llama, {"heads_fraction": 1.0}, r"heads_fraction=1.0 must be in \[0, 1\)"),
    (tiny_llama, {"mlp_fraction": -0.1}, r"mlp_fraction=-0.1 must be in \[0, 1\)"),
    (tiny_llama, {"mlp_fraction": 0.999}, "would remove all 128 MLP channels"),
    (tiny_llama, {}, "needs heads_fraction > 0 or mlp_fraction > 0"),
])
def test_width_bad_parameters(make, params, match):
    with pytest.raises(LeanfmError, match=match):
        leanfm.apply_(make(), {"method": "width", **params}, calib=CALIB)


def test_width_refuses_factorized_layers():
    model = tiny_llama()
    leanfm.apply_(model, {"method": "svd", "param_ratio": 0.5})
    with pytest.raises(LeanfmError, match="apply width pruning first"):
        leanfm.apply_(model, {"method": "width", "mlp_fraction": 0.25}, calib=CALIB)


def test_structured_recipes():
    drop, width = load_recipe("layerdrop25"), load_recipe("width25")
    assert (drop.steps[0].method, drop.steps[0].fraction) == ("layerdrop", 0.25)
    assert (width.steps[0].method, width.steps[0].mlp_fraction, width.steps[0].heads_fraction) == ("width", 0.25, 0.0)
    model = tiny_llama(layers=4)
    leanfm.apply_(model, "layerdrop25", calib=CALIB)
    assert model.config.num_hidden_layers == 3
