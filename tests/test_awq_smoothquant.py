"""AWQ and SmoothQuant: scale folding found generically, exact before quantization, better than RTN."""
from __future__ import annotations

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import load_quantized, save_quantized
from leanfm.methods.fold import find_producer
from leanfm.methods.quantize.awq_math import apply_clip, search_clip, search_scale
from leanfm.methods.quantize.grid import dequantize, rtn_quantize
from leanfm.methods.quantize.smoothquant import fake_quant_act, smooth_, smooth_scales
from tests.conftest import tiny_gemma3, tiny_llama

MODELS = [tiny_llama, tiny_gemma3]


def _observer(model, layer_idx, lin, ids):
    def observe():
        grab = {}
        h = lin.register_forward_hook(lambda m, a, o: grab.update(x=a[0].detach()))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        return grab["x"].reshape(-1, grab["x"].shape[-1])

    return observe


@pytest.mark.parametrize("make,mode", [(tiny_llama, "mul"), (tiny_gemma3, "one_plus")], ids=["llama", "gemma3"])
def test_find_producer_identifies_the_norm_and_up_proj(make, mode):
    m = make()
    layer = m.model.layers[0]
    ids = torch.randint(3, 250, (1, 16))
    attn = layer.self_attn
    prod = find_producer(layer, [attn.q_proj, attn.k_proj, attn.v_proj], _observer(m, 0, attn.q_proj, ids))
    assert prod is not None and prod[0] is layer.input_layernorm and prod[1] == mode
    prod = find_producer(layer, [layer.mlp.down_proj], _observer(m, 0, layer.mlp.down_proj, ids))
    assert prod is not None and prod[0] is layer.mlp.up_proj
    # GQA: o_proj's input is not channel-wise linear in any single producer
    assert find_producer(layer, [attn.o_proj], _observer(m, 0, attn.o_proj, ids)) is None


@pytest.mark.parametrize("make", MODELS, ids=["llama", "gemma3"])
def test_smoothquant_migration_leaves_outputs_unchanged(make):
    m = make()
    ids = torch.randint(3, 250, (2, 32))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    counts = smooth_(m, torch.randint(3, 250, (4, 32)), alpha=0.5)
    assert counts["smoothed_groups"] >= 2 * len(m.model.layers)
    with torch.no_grad():
        got = m(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_smooth_scales_formula_and_activation_quant():
    act = torch.tensor([4.0, 1.0, 0.25])
    w = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-0.5, 1.0, 1.0]])]
    s = smooth_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 0.5]) / torch.tensor([1.0, 2.0, 1.0]).sqrt())
    x = torch.randn(3, 50)
    q = fake_quant_act(x, 8)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((q - x).abs() <= step / 2 + 1e-7).all()


def test_awq_scale_search_beats_plain_rtn_with_an_outlier_channel():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    x[:, 3] *= 30  # one salient input channel (the paper's observation)
    w = torch.randn(64, 128) * 0.1
    s, alpha = search_scale(x, [w], 3, 32, False)
    err = lambda wq, xs: ((xs @ wq.t() - x @ w.t()) ** 2).mean().item()
    fq = lambda w_: dequantize(*(lambda q: (q.codes, q.scale, q.zero, q.group_size))(rtn_quantize(w_, 3, 32, False)))
    assert alpha > 0 and err(fq(w * s), x / s) < err(fq(w), x)
    clip = search_clip(x, w, 3, 32, False)
    assert clip.shape == (64, 4) and (clip <= w.reshape(64, 4, 32).abs().amax(-1) + 1e-7).all()
    assert err(fq(apply_clip(w, clip, 32)), x) <= err(fq(w), x) + 1e-9


@pytest.mark.parametrize("make", MODELS, ids=["llama", "gemma3"])
def test_awq_on_tiny_model_beats_rtn(make):
    calib, ev = torch.randint(3, 250, (8, 64)), torch.randint(3, 250, (4, 64))
    ref_m = make()
    with torch.no_grad():
        ref = ref_m(input_ids=ev).logits
    errs = {}
    for meth in ("rtn", "awq"):
        m = leanfm.apply_(make(), {"method": meth, "bits": 3, "group_size": 32, "symmetric": False}, calib=calib)
        with torch.no_grad():
            errs[meth] = ((m(input_ids=ev).logits - ref) ** 2).mean().item()
    assert errs["awq"] < errs["rtn"]
    assert m.leanfm_info["steps"][-1]["scaled_groups"] >= 2 * len(m.model.layers)


@pytest.mark.parametrize("sym", [True, False], ids=["q4_0", "q4_1"])
def test_awq_on_llama_cpp_blocks_beats_llama_cpp_rounding(sym):
    """AWQ with rounding llama.cpp searches and rounds on llama.cpp's block grid: its weights fit
    the block type and its output error is below llama.cpp's own rounding of the same model."""
    from leanfm.formats.gguf_blocks import fit_problem
    from leanfm.kernels.checkpoint import quantized_layers

    calib, ev = torch.randint(3, 250, (8, 64)), torch.randint(3, 250, (4, 64))
    with torch.no_grad():
        ref = tiny_llama()(input_ids=ev).logits
    errs = {}
    for meth in ("rtn", "awq"):
        step = {"method": meth, "bits": 4, "group_size": 32, "symmetric": sym, "rounding": "llama.cpp", "backend": "reference"}
        m = leanfm.apply_(tiny_llama(), step, calib=calib)
        with torch.no_grad():
            errs[meth] = ((m(input_ids=ev).logits - ref) ** 2).mean().item()
        layers = quantized_layers(m)
        assert layers and all(fit_problem(q.quantized_weight(), "q4_0" if sym else "q4_1") is None for q in layers.values())
    assert errs["awq"] < errs["rtn"]


def test_smoothquant_recipe_is_marked_simulated_and_reloads(tmp_path):
    m = leanfm.apply_(tiny_llama(), "smoothquant-w8a8", calib=torch.randint(3, 250, (4, 64)))
    step = m.leanfm_info["steps"][-1]
    assert step["simulated"] is True and "fake-quant per-token activations" in step["kernel"] and "int8pack" in step["kernel"]
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    save_quantized(m, tmp_path)
    back = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)


def test_smoothquant_bad_alpha():
    with pytest.raises(LeanfmError, match="alpha=1.5"):
        leanfm.apply_(tiny_llama(), {"method": "smoothquant", "alpha": 1.5}, calib=torch.randint(3, 250, (4, 64)))
