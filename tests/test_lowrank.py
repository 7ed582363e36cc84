"""Low-rank factorization: SVD / activation-aware SVD math on one nn.Linear, and the model glue."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import leanfm
from leanfm.errors import LeanfmError
from leanfm.measure.flops import linear_flops_per_token
from leanfm.kernels.lowrank import LowRankLinear, install_layout, load_lowrank, lowrank_layout, save_lowrank
from leanfm.methods.lowrank.svd_math import ActStats, rank_for, saves_params, scaled_svd, truncated_svd, whitened_svd
from leanfm.recipe import load_recipe
from tests.conftest import tiny_gemma3, tiny_llama

CALIB = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
FAMILIES = pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])


def anisotropic_inputs(k: int = 64, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated features with magnitudes spread over two decades (as LLM activations, with outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return (torch.randn(n, k, generator=g) @ mix) * scales


def out_err(x, w, a, b) -> float:
    return (x @ (w - b @ a).t()).norm().item()


def logits(model, ids=CALIB):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- math on one layer ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 64), (64, 48)], ids=["wide", "tall"])
def test_every_factorization_is_exact_at_full_rank(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    x = anisotropic_inputs(shape[1], n=256)
    stats = ActStats(shape[1], gram=True, magnitude=True)
    stats.add(x)
    r = min(shape)
    for a, b in (truncated_svd(w, r), whitened_svd(w, stats.xtx, r), scaled_svd(w, stats.abs_mean, r)):
        assert a.shape == (r, shape[1]) and b.shape == (shape[0], r) and a.dtype == w.dtype
        assert torch.allclose(b @ a, w, atol=1e-5, rtol=1e-5)


def test_act_stats_accumulate_in_chunks():
    x = anisotropic_inputs(16, n=300)
    st = ActStats(16, gram=True, magnitude=True)
    for chunk in x.split(70):
        st.add(chunk)
    assert st.n == 300
    ref = x.double().t() @ x.double()
    assert torch.allclose(st.xtx, ref, rtol=0, atol=1e-5 * ref.abs().max().item())  # fp32 products, fp64 sums
    assert torch.allclose(st.abs_mean, x.double().abs().mean(0), rtol=1e-6)


def test_truncated_svd_is_the_best_approximation_of_the_weight():
    w = torch.randn(32, 40)
    a, b = truncated_svd(w, 8)
    s = torch.linalg.svdvals(w.double())
    assert (w - b @ a).norm().item() == pytest.approx(s[8:].norm().item(), rel=1e-5)  # Eckart-Young


def test_whitened_error_equals_the_dropped_singular_values_of_ws():
    """SVD-LLM Theorem 3.2: with X^T X = S S^T, the output error of truncating W S is exactly
    the norm of its dropped singular values."""
    w, x = torch.randn(32, 64), anisotropic_inputs(64)
    xtx = x.double().t() @ x.double()
    a, b = whitened_svd(w, xtx, 10, damp=0.0)
    s = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky(xtx))
    assert out_err(x, w, a, b) == pytest.approx(s[10:].norm().item(), rel=1e-3)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_activation_aware_beats_plain_svd_on_output_error(rank):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    w, x = lin.weight.detach(), anisotropic_inputs(64)
    stats = ActStats(64, gram=True, magnitude=True)
    stats.add(x)
    plain = out_err(x, w, *truncated_svd(w, rank))
    whiten = out_err(x, w, *whitened_svd(w, stats.xtx, rank))
    diag = out_err(x, w, *scaled_svd(w, stats.abs_mean, rank))
    assert whiten < 0.8 * plain and diag < plain
    assert whiten <= diag * 1.001  # whitening is optimal for the calibration inputs


def test_whitening_survives_a_rank_deficient_gram_matrix():
    w, x = torch.randn(16, 32), torch.randn(8, 32)  # 8 tokens: X^T X has rank 8 < 32
    a, b = whitened_svd(w, x.double().t() @ x.double(), 16, damp=0.0)  # damping grows until Cholesky succeeds
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_rank_from_ratios():
    assert rank_for(576, 1536, param_ratio=0.7) == int(0.7 * 576 * 1536 / (576 + 1536))
    assert rank_for(64, 128, rank_ratio=0.5) == 32 and rank_for(64, 128, rank_ratio=1.0) == 64
    assert rank_for(64, 128, rank=7, rank_ratio=0.5, param_ratio=0.7) == 7  # explicit rank wins
    assert saves_params(64, 64, 31) and not saves_params(64, 64, 32)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank=0 gives rank 0"),
    ({"rank": 65}, "rank=65 gives rank 65 for layer, above min"),
    ({"rank_ratio": 0.001}, "rank_ratio=0.001 gives rank 0"),
    ({"param_ratio": 0.001}, "param_ratio=0.001 gives rank 0"),
    ({}, "needs one of rank, rank_ratio or param_ratio"),
])
def test_rank_for_bad_inputs(kwargs, match):
    with pytest.raises(LeanfmError, match=match):
        rank_for(64, 128, **kwargs)


def test_shape_checks():
    with pytest.raises(LeanfmError, match=r"X\^T X must be \[in, in\]"):
        whitened_svd(torch.randn(4, 8), torch.eye(4), 2)
    with pytest.raises(LeanfmError, match="must have in = 8 entries"):
        scaled_svd(torch.randn(4, 8), torch.ones(4), 2)


# ---- model glue -----------------------------------------------------------------------------

@FAMILIES
def test_svd_replaces_linears_and_really_shrinks(make):
    model = make()
    before = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    flops0 = linear_flops_per_token(model)
    leanfm.apply_(model, {"method": "svd", "param_ratio": 0.5})
    step = model.leanfm_info["steps"][-1]
    assert step["simulated"] is False and step["kernel"] == "dense fp32 (two smaller GEMMs)"
    assert set(step["ranks"]) | set(step["skipped_layers"]) == set(before) and step["ranks"]
    assert isinstance(model.lm_head, nn.Linear)  # skipped by default
    saved = 0
    for n, r in step["ranks"].items():
        mod = model.get_submodule(n)
        i, o = before[n]
        assert isinstance(mod, LowRankLinear) and mod.rank == r == int(0.5 * i * o / (i + o))
        assert mod.a.weight.shape == (r, i) and mod.b.weight.shape == (o, r)
        saved += i * o - r * (i + o)
    assert step["params_before"] - step["params_after"] == saved > 0
    assert step["params_after"] == sum(p.numel() for p in model.parameters())
    assert flops0 - linear_flops_per_token(model) == 2 * saved  # the FLOP counter sees both factors
    assert torch.isfinite(logits(model)).all()


def test_svd_skips_layers_where_factorizing_saves_nothing():
    model = tiny_llama()
    ref = logits(model)
    leanfm.apply_(model, {"method": "svd", "rank_ratio": 1.0})
    step = model.leanfm_info["steps"][-1]
    assert step["ranks"] == {} and len(step["skipped_layers"]) == 14
    assert step["params_after"] == step["params_before"] and torch.equal(logits(model), ref)


def test_tied_lm_head_is_not_factorized():
    model = tiny_llama(tie=True)
    leanfm.apply_(model, {"method": "svd", "param_ratio": 0.5, "skip": [], "only": ["lm_head"]})
    step = model.leanfm_info["steps"][-1]
    assert step["skipped_layers"] == ["lm_head"] and step["params_after"] == step["params_before"]
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_factors_are_never_refactorized():
    model = tiny_llama()
    leanfm.apply_(model, {"method": "svd", "rank": 16, "only": ["k_proj"]})
    assert len(lowrank_layout(model)) == 2
    with pytest.raises(LeanfmError, match="found no nn.Linear layers to factorize"):
        leanfm.apply_(model, {"method": "svd", "rank": 8, "only": ["k_proj", "a", "b"]})


@FAMILIES
def test_asvd_is_closer_to_the_original_than_svd_at_the_same_budget(make):
    """On the calibration windows (what whitening optimizes; a random tiny model's activations are
    nearly isotropic, so held-out gains are small here: the one-layer test above is the real check)."""
    base = make()
    ref = logits(base)
    errs = {}
    for method, extra in (("svd", {}), ("asvd", {"scaling": "whiten"}), ("asvd", {"scaling": "diag"})):
        model = make()
        leanfm.apply_(model, {"method": method, "param_ratio": 0.4, **extra}, calib=CALIB)
        step = model.leanfm_info["steps"][-1]
        assert step["simulated"] is False and step["params_after"] < step["params_before"]
        errs[extra.get("scaling", "plain")] = ((logits(model) - ref).norm() / ref.norm()).item()
    assert errs["whiten"] < 0.85 * errs["plain"], errs
    assert errs["diag"] < 1.05 * errs["plain"], errs


def test_asvd_unskipped_lm_head_falls_back_to_plain_svd():
    model = tiny_llama(tie=False)
    leanfm.apply_(model, {"method": "asvd", "param_ratio": 0.5, "skip": [], "only": ["lm_head", "q_proj"]}, calib=CALIB)
    step = model.leanfm_info["steps"][-1]
    assert step["plain_svd_layers"] == ["lm_head"] and isinstance(model.lm_head, LowRankLinear)
    assert len(step["ranks"]) == 3


@FAMILIES
def test_lowrank_checkpoint_round_trip(make, tmp_path):
    model = make()
    leanfm.apply_(model, {"method": "asvd", "param_ratio": 0.6}, calib=CALIB)
    save_lowrank(model, tmp_path)
    again = load_lowrank(tmp_path)
    assert lowrank_layout(again) == lowrank_layout(model)
    assert torch.allclose(logits(again), logits(model), atol=1e-5)
    # state_dict route, without any file format: rebuild the layout, then load the tensors
    fresh = make(seed=1)
    install_layout(fresh, lowrank_layout(model))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh), logits(model))


def test_loading_a_non_lowrank_dir_is_refused(tmp_path):
    with pytest.raises(LeanfmError, match="not a leanfm low-rank checkpoint"):
        load_lowrank(tmp_path)


@pytest.mark.parametrize("params,match", [
    ({"param_ratio": 0.0}, r"param_ratio=0.0 must be in \(0, 1\)"),
    ({"param_ratio": 1.0}, r"param_ratio=1.0 must be in \(0, 1\)"),
    ({"rank_ratio": 0.0}, r"rank_ratio=0.0 must be in \(0, 1\]"),
    ({"rank_ratio": 1.5}, r"rank_ratio=1.5 must be in \(0, 1\]"),
    ({"rank": 0}, "rank=0 must be >= 1"),
    ({"rank": 33}, "rank=33 gives rank 33 for model.layers.0.self_attn.k_proj, above min"),
    ({"param_ratio": None}, "needs one of rank, rank_ratio or param_ratio"),
    ({"only": ["nothing"]}, "found no nn.Linear layers"),
])
@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_lowrank_bad_parameters(method, params, match):
    with pytest.raises(LeanfmError, match=match):
        leanfm.apply_(tiny_llama(), {"method": method, **params}, calib=CALIB)


@pytest.mark.parametrize("params,match", [
    ({"scaling": "cholesky"}, "unknown scaling 'cholesky'"),
    ({"alpha": 0.0}, r"alpha=0.0 must be in \(0, 2\]"),
    ({"damp": 1.0}, r"damp=1.0 must be in \[0, 1\)"),
])
def test_asvd_bad_parameters(params, match):
    with pytest.raises(LeanfmError, match=match):
        leanfm.apply_(tiny_llama(), {"method": "asvd", **params}, calib=CALIB)


def test_asvd_missing_or_empty_calibration_is_refused():
    with pytest.raises(LeanfmError, match="method asvd needs calibration data"):
        leanfm.apply_(tiny_llama(), {"method": "asvd"}, calib=None)
    with pytest.raises(LeanfmError, match="empty or missing"):
        leanfm.apply_(tiny_llama(), {"method": "asvd"}, calib=torch.zeros(0, 0, dtype=torch.long))


def test_lowrank_recipes():
    svd, asvd = load_recipe("svd70").steps[0], load_recipe("asvd70").steps[0]
    assert (svd.method, svd.param_ratio, asvd.method, asvd.param_ratio, asvd.scaling) == ("svd", 0.7, "asvd", 0.7, "whiten")
    model = tiny_llama()
    leanfm.apply_(model, "asvd70", calib=CALIB)
    step = model.leanfm_info["steps"][-1]
    assert step["method"] == "asvd" and step["params_after"] < step["params_before"]
