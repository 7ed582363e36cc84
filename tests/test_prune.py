"""Pruning: mask math, SparseGPT on one nn.Linear, OWL allocation, and the three methods end to
end on tiny Llama and Gemma3 models."""
from __future__ import annotations

import math

import pytest
import torch

import leanfm
from leanfm.config import config_from_dict
from leanfm.errors import LeanfmError
from leanfm.methods.prune.masks import (
    magnitude_scores, nm_mask, outlier_ratio, owl_sparsities, parse_pattern, unstructured_mask, wanda_scores,
)
from leanfm.methods.prune.sparsegpt_math import sparsegpt_prune
from leanfm.methods.prune.sparsity import KERNEL
from leanfm.methods.quantize.gptq_math import HessianAccumulator
from leanfm.methods.quantize.grid import dequantize
from leanfm.recipe import builtin_names, load_recipe
from tests.conftest import tiny_gemma3, tiny_llama

METHODS = ["magnitude", "wanda", "sparsegpt"]
PRUNE_RECIPES = ["magnitude50", "wanda50", "sparsegpt50", "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4"]


def _fixed_inputs(k=128, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))  # uneven feature norms, as in LLM activations
    return (torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)) * scale


def _calib(n=4, seqlen=64):
    return torch.randint(3, 250, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _proj_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("proj")}


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m, ties):
    scores = torch.rand(16, 64)
    if ties:
        scores = torch.ones(16, 64)
        scores[::2, ::3] = 2.0
    keep = nm_mask(scores, n, m)
    per_group = keep.reshape(16, 64 // m, m).sum(-1)
    assert torch.all(per_group == n)
    if not ties:  # the kept ones are the largest of their group
        g = scores.reshape(16, -1, m)
        kept_min = torch.where(keep.reshape(g.shape), g, torch.inf).amin(-1)
        dropped_max = torch.where(keep.reshape(g.shape), -torch.inf, g).amax(-1)
        assert torch.all(kept_min > dropped_max)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_hits_requested_sparsity(sparsity, per_row):
    scores = torch.rand(32, 80)
    scores[:, :10] = 0.5  # ties
    keep = unstructured_mask(scores, sparsity, per_row)
    assert int((~keep).sum()) == round(sparsity * 32 * 80)
    if per_row:  # each row prunes floor or ceil of sparsity * in, its lowest scores
        assert set((~keep).sum(1).tolist()) <= {math.floor(sparsity * 80), math.ceil(sparsity * 80)}
        for r in range(32):
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    else:
        assert scores[~keep].max() <= scores[keep].min()


def test_wanda_scores_compare_per_row_with_input_norms():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    s = wanda_scores(w, torch.tensor([4.0, 1.0]))
    assert torch.equal(s, torch.tensor([[4.0, 2.0], [12.0, 0.5]]))
    keep = unstructured_mask(s, 0.5, per_row=True)  # row 0 drops |-2|·1 though |W| says drop 1.0
    assert keep.tolist() == [[True, False], [True, False]]
    assert torch.equal(magnitude_scores(w), w.abs())


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)


# ---------------------------------------------------------------- OWL


def test_owl_keeps_the_mean_and_gives_outlier_layers_less_sparsity():
    ratios = [0.001, 0.01, 0.002, 0.05, 0.003, 0.004]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert abs(sum(s) / len(s) - 0.7) < 1e-9
    assert all(0.62 - 1e-12 <= v <= 0.78 + 1e-12 for v in s)
    assert min(s) == s[3] and max(s) == s[0]  # most outliers -> least pruned
    assert len(set(round(v, 6) for v in s)) == len(s)
    assert owl_sparsities([0.01, 0.01], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_counts_scores_above_m_times_mean():
    s = torch.ones(100)
    s[:3] = 50.0
    assert outlier_ratio([s[:50], s[50:]], 5.0) == pytest.approx(0.03)


# ---------------------------------------------------------------- SparseGPT on one nn.Linear


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.H


def _out_err(x, w, w2):
    return (x @ (w - w2).t()).norm().item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_beats_magnitude_and_wanda_on_output_error(pattern):
    torch.manual_seed(0)
    w = torch.nn.Linear(128, 64, bias=False).weight.detach()
    x = _fixed_inputs()
    nm = parse_pattern(pattern)
    norms = x.norm(dim=0)

    def masked(scores, per_row):
        keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, 0.5, per_row)
        return w * keep

    res = sparsegpt_prune(w, _hessian(x), 0.5, nm, block_size=32)
    assert float((res.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert torch.all(res.weight[~res.mask] == 0)
    if nm:
        assert torch.all((res.weight != 0).reshape(64, -1, nm[1]).sum(-1) <= nm[0])
    e_sgpt = _out_err(x, w, res.weight)
    e_mag = _out_err(x, w, masked(magnitude_scores(w), per_row=False))
    e_wanda = _out_err(x, w, masked(wanda_scores(w, norms), per_row=True))
    # measured here: SparseGPT ~0.8x Wanda's error, Wanda ~0.25-0.3x magnitude's (uneven input norms)
    assert e_sgpt < 0.9 * e_wanda and e_wanda < 0.5 * e_mag


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_with_identity_hessian_is_magnitude_pruning(nm):
    # H = I, no damping: the OBS update never moves other columns, ε = w², so the mask is the
    # magnitude mask of each block (unstructured) or each group (N:M) and kept weights are unchanged.
    w = torch.randn(16, 64)
    res = sparsegpt_prune(w, torch.eye(64), 0.5, nm, block_size=64, damp=0.0)
    ref = nm_mask(w.abs(), *nm) if nm else unstructured_mask(w.abs(), 0.5, per_row=False)
    assert torch.equal(res.mask, ref) and torch.equal(res.weight, w * ref)


@pytest.mark.parametrize("bits,group,sym", [(4, None, True), (4, 32, False), (3, 64, True)])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_quant_sparsegpt_weights_are_on_the_grid_and_zero_where_masked(bits, group, sym, pattern):
    torch.manual_seed(0)
    w = torch.nn.Linear(128, 32, bias=False).weight.detach()
    x = _fixed_inputs()
    res = sparsegpt_prune(w, _hessian(x), 0.5, parse_pattern(pattern), block_size=64, bits=bits, group_size=group, symmetric=sym)
    q = res.quant
    assert q is not None and q.bits == bits and int(q.codes.max()) < 2**bits
    assert torch.equal(res.weight, dequantize(q.codes, q.scale, q.zero, q.group_size))  # exactly on the grid
    assert torch.all(res.weight[~res.mask] == 0)
    assert float((res.weight == 0).float().mean()) >= 0.5
    # joint mode still beats prune-then-round (magnitude mask + RTN of the survivors)
    from leanfm.methods.quantize.grid import fake_quantize

    nm = parse_pattern(pattern)
    keep = nm_mask(w.abs(), *nm) if nm else unstructured_mask(w.abs(), 0.5, per_row=False)
    assert _out_err(x, w, res.weight) < _out_err(x, w, fake_quantize(w * keep, bits, group, sym))


def test_sparsegpt_math_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(LeanfmError, match="H \\[in, in\\]"):
        sparsegpt_prune(w, torch.eye(8))
    with pytest.raises(LeanfmError, match="damp"):
        sparsegpt_prune(w, torch.eye(16), damp=1.5)
    with pytest.raises(LeanfmError, match="bits=9"):
        sparsegpt_prune(w, torch.eye(16), bits=9)
    with pytest.raises(LeanfmError, match="block_size"):
        sparsegpt_prune(w, torch.eye(16), nm=(2, 4), block_size=6)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_methods_prune_tiny_models_end_to_end(make, method, pattern):
    model = make()
    calib = _calib()
    with torch.no_grad():
        ref = model(input_ids=calib).logits
    step = {"method": method, "pattern": pattern}
    if pattern == "unstructured":
        step["sparsity"] = 0.5
    leanfm.apply_(model, step, calib=calib)
    info = model.leanfm_info["steps"][-1]
    assert info["simulated"] is True and info["kernel"] == KERNEL
    assert info["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)
    assert info["layers"] == len(_proj_weights(model))
    for name, wt in _proj_weights(model).items():
        assert float((wt == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
        if pattern == "2:4":
            assert torch.all((wt != 0).reshape(wt.shape[0], -1, 4).sum(-1) <= 2), name
    with torch.no_grad():
        got = model(input_ids=calib).logits
    assert torch.isfinite(got).all() and not torch.equal(got, ref)


def test_calibrated_pruning_keeps_the_model_closer_than_magnitude():
    calib = _calib(8, 64)
    errs = {}
    for method in METHODS:
        model = tiny_llama()
        with torch.no_grad():
            ref = model(input_ids=calib).logits
        leanfm.apply_(model, {"method": method, "sparsity": 0.5}, calib=calib)
        with torch.no_grad():
            errs[method] = ((model(input_ids=calib).logits - ref).norm() / ref.norm()).item()
    assert errs["sparsegpt"] < errs["magnitude"] and errs["wanda"] <= errs["magnitude"] * 1.05, errs


def _with_outliers(model, layer=0):
    # give one decoder layer a few heavy input columns, as the outlier features OWL looks for
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.startswith(f"model.layers.{layer}.") and isinstance(m, torch.nn.Linear):
                m.weight[:, :2] *= 40.0
    return model


@pytest.mark.parametrize("method", METHODS)
def test_owl_allocation_varies_per_layer_and_keeps_the_mean(method):
    model = _with_outliers(tiny_llama(layers=3))
    leanfm.apply_(model, {"method": method, "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1}, calib=_calib())
    info = model.leanfm_info["steps"][-1]
    ls = info["layer_sparsity"]
    assert len(ls) == 3 and sum(ls) / 3 == pytest.approx(0.5, abs=1e-6)
    assert ls[0] == min(ls) and ls[0] < 0.5 - 0.05  # the outlier layer is pruned less
    assert info["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)
    for i, s in enumerate(ls):
        w = model.model.layers[i].mlp.down_proj.weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=0.01)


def test_unskipped_lm_head_falls_back_to_magnitude():
    model = tiny_llama(tie=False)
    leanfm.apply_(model, {"method": "wanda", "sparsity": 0.5, "skip": []}, calib=_calib())
    info = model.leanfm_info["steps"][-1]
    assert info["magnitude_fallback"] == ["lm_head"]
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_joint_quant_sparsegpt_on_a_tiny_model():
    model = tiny_llama()
    leanfm.apply_(model, {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32}, calib=_calib())
    w = model.model.layers[1].self_attn.q_proj.weight.detach()
    assert (w != 0).reshape(w.shape[0], -1, 4).sum(-1).max() <= 2
    groups = w.reshape(-1, 32)  # one 4-bit grid per (row, group of 32 columns): at most 16 values, 0 among them
    assert max(g.unique().numel() for g in groups) <= 16


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", PRUNE_RECIPES)
def test_prune_recipes_load_by_name(name):
    assert name in builtin_names()
    r = load_recipe(name)
    assert r.name == name and len(r.steps) == 1 and r.seed == 0
    step = r.steps[0]
    assert step.method == name.split("-")[0].rstrip("0123456789")
    assert step.target_sparsity == 0.5 and step.nm == ((2, 4) if ":" in name else None)


def test_recipe_names_with_colons_map_to_portable_file_names():
    from importlib import resources

    files = {p.name for p in resources.files("leanfm.recipes").iterdir()}
    assert "wanda-2%3A4.yaml" in files and not any(":" in f for f in files)
    assert load_recipe("rtn-w4").name == "rtn-w4"  # plain names unchanged
    with pytest.raises(LeanfmError, match="unknown recipe 'wanda-3:4'"):
        load_recipe("wanda-3:4")


def test_prune_recipe_applies():
    model = tiny_llama()
    leanfm.apply_(model, "wanda-2:4", calib=_calib())
    assert model.leanfm_info["steps"][-1]["pattern"] == "2:4"


# ---------------------------------------------------------------- errors


def _one_line_error(fn, match):
    with pytest.raises(LeanfmError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("params,match", [
    ({"sparsity": 0}, r"sparsity 0 is outside \(0, 1\); use a fraction such as 0.5"),
    ({"sparsity": 1}, r"sparsity 1 is outside \(0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity -0.1 is outside \(0, 1\)"),
    ({"sparsity": 1.5}, r"sparsity 1.5 is outside \(0, 1\)"),
    ({"pattern": "3:4:5"}, r"pattern '3:4:5' is malformed"),
    ({"pattern": "4:2"}, r"N must be at least 1 and smaller than M"),
    ({"pattern": "4:4"}, r"N must be at least 1 and smaller than M"),
    ({"pattern": "2:4", "sparsity": 0.7}, r"sparsity 0.7 contradicts pattern '2:4'.*set it to 0.5"),
    ({"pattern": 124}, r"unquoted 2:4 .* quote it"),
    ({"allocation": "owl", "pattern": "2:4"}, r"allocation owl is for unstructured sparsity only"),
    ({"allocation": "best"}, r"unknown allocation 'best'"),
    ({"allocation": "owl", "sparsity": 0.9, "owl_lambda": 0.2}, r"owl_lambda=0.2 must be in \[0, 0.1\)"),
])
def test_bad_parameters_give_one_line_errors(method, params, match):
    _one_line_error(lambda: config_from_dict({"method": method, **params}), match)


def test_sparsegpt_specific_bad_parameters():
    _one_line_error(lambda: config_from_dict({"method": "sparsegpt", "bits": 12}), "bits=12")
    _one_line_error(lambda: config_from_dict({"method": "sparsegpt", "group_size": 64}), "group_size only applies")
    _one_line_error(lambda: config_from_dict({"method": "sparsegpt", "pattern": "4:8", "block_size": 100}), "multiple of M=8")


@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern_must_divide_in_features(method):
    model = tiny_llama(hidden=36, heads=6, kv_heads=2)  # 36 % 8 != 0
    before = [p.detach().clone() for p in model.parameters()]
    _one_line_error(lambda: leanfm.apply_(model, {"method": method, "pattern": "4:8"}, calib=_calib()),
                    r"pattern '4:8' needs in_features divisible by 8, but layer model.layers.0.self_attn.q_proj has 36")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_refuse_missing_calibration(method):
    _one_line_error(lambda: leanfm.apply_(tiny_llama(), {"method": method, "sparsity": 0.5}), f"method {method} needs calibration data")


@pytest.mark.parametrize("method", METHODS)
def test_pruning_a_packed_quantized_model_is_refused(method):
    model = tiny_llama()
    leanfm.apply_(model, {"method": "rtn", "bits": 4, "group_size": 32})
    _one_line_error(lambda: leanfm.apply_(model, {"method": method, "sparsity": 0.5}, calib=_calib()),
                    r"cannot apply .*packed 4-bit quantized weights; prune the full-precision model first")
