"""CSR execution of pruned layers, and pruning composed with quantization through recipes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import quantized_layers
from leanfm.kernels.sparse import SparseLinear
from leanfm.measure.flops import linear_flops_per_token
from leanfm.measure.memory import weight_bytes
from leanfm.methods.quantize.grid import dequantize
from leanfm.recipe import load_recipe
from tests.conftest import tiny_llama


def test_sparse_linear_matches_the_masked_dense_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.7] = 0
    sp = SparseLinear(lin.weight, lin.bias)
    assert sp.nnz == int((lin.weight != 0).sum())
    for shape in [(1, 1, 96), (3, 7, 96)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(sp(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(sp.dense_weight(), lin.weight.detach())
    assert weight_bytes(sp) < weight_bytes(lin)  # 30% dense: values + int32 indices beat fp32 dense


@pytest.mark.parametrize("cfg", [{"method": "magnitude", "sparsity": 0.5, "backend": "csr"},
                                 {"method": "magnitude", "pattern": "2:4", "backend": "csr"}], ids=["50%", "2:4"])
def test_csr_backend_is_real_and_counts_only_nonzeros(cfg):
    masked = leanfm.apply_(tiny_llama(), {**cfg, "backend": "masked"})
    model = leanfm.apply_(tiny_llama(), cfg)
    step = model.leanfm_info["steps"][0]
    assert step["simulated"] is False and "sparse.mm" in step["kernel"]
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14
    assert linear_flops_per_token(model) < 0.75 * linear_flops_per_token(masked)  # lm_head stays dense
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_composed_recipe_by_name():
    r = load_recipe("wanda50+gptq-w4g64")
    assert r.name == "wanda50+gptq-w4g64" and [s.method for s in r.steps] == ["wanda", "gptq"]
    with pytest.raises(LeanfmError, match="join built-in names with"):
        load_recipe("wanda50+nosuch")


def test_pruning_then_gptq_keeps_the_sparsity():
    model = leanfm.apply_(tiny_llama(), {"method": "wanda", "sparsity": 0.5}, calib=torch.randint(3, 250, (4, 64)))
    leanfm.apply_(model, {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}, calib=torch.randint(3, 250, (4, 64)))
    for name, q in quantized_layers(model).items():
        qw = q.quantized_weight()
        w = dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)
        assert (w == 0).float().mean() >= 0.5, name


def test_layerdrop_then_rtn_w8_runs_end_to_end():
    model = tiny_llama(layers=4)
    leanfm.apply_(model, "layerdrop25+rtn-w8", calib=torch.randint(3, 250, (4, 64)))
    assert model.config.num_hidden_layers == 3 and len(quantized_layers(model)) == 3 * 7
    with torch.no_grad():
        out = model.generate(torch.randint(3, 250, (1, 5)), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
