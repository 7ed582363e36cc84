"""GPTQ math on one nn.Linear, the layer-by-layer runner, and the model glue on tiny models."""
from __future__ import annotations

import pytest
import torch

import leanfm
from tests.conftest import tiny_gemma3, tiny_llama
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import quantized_layers
from leanfm.methods.layers import LayerwiseRunner
from leanfm.methods.quantize.gptq_math import HessianAccumulator, gptq_quantize
from leanfm.methods.quantize.grid import dequantize, rtn_quantize


def _fixed_inputs(k=128, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)  # correlated features


def _out_mse(x, w, qw):
    return ((x @ (w - dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)).t()) ** 2).mean().item()


def test_hessian_accumulator_equals_closed_form():
    x = _fixed_inputs()
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, None, True, False), (4, None, True, True), (4, 32, False, False), (4, 32, False, True), (3, None, True, False),
])
def test_gptq_beats_rtn_on_output_mse(bits, group, sym, act_order):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    x = _fixed_inputs()
    acc = HessianAccumulator(128)
    acc.add(x)
    w = lin.weight.detach()
    g = gptq_quantize(w, acc.H, bits, group, sym, act_order=act_order)
    r = rtn_quantize(w, bits, group, sym)
    assert g.codes.dtype == torch.uint8 and int(g.codes.max()) < 2**bits
    assert _out_mse(x, w, g) < 0.8 * _out_mse(x, w, r)


@pytest.mark.parametrize("qtype,bits,sym", [("q4_0", 4, True), ("q4_1", 4, False), ("q8_0", 8, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_llama_cpp_blocks_fits_the_type_and_beats_llama_cpp_rounding(qtype, bits, sym, act_order):
    """rounding llama.cpp: every group's scale is llama.cpp's fp16 block scale, so the codes are
    written into the block type unchanged (to_blocks decodes to exactly leanfm's values), and
    GPTQ's error feedback beats llama.cpp's own round-to-nearest on the same blocks."""
    from leanfm.formats.gguf_blocks import fit_problem, llama_grid, to_blocks
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    torch.manual_seed(0)
    w = torch.nn.Linear(128, 64, bias=False).weight.detach()
    x = _fixed_inputs()
    acc = HessianAccumulator(128)
    acc.add(x)
    g = gptq_quantize(w, acc.H, bits, 32, sym, act_order=act_order, rounding="llama.cpp")
    assert fit_problem(g, qtype) is None
    deq = dequantize(g.codes, g.scale, g.zero, g.group_size)
    blocks = to_blocks(g, qtype)
    back = quants.dequantize(blocks, getattr(GGMLQuantizationType, qtype.upper()))
    tol = 0 if qtype != "q4_1" else 1e-6 * float(w.abs().max())  # Q4_1: d*q + m vs s*(q - z) in fp32
    assert np.abs(back - deq.numpy()).max() <= tol
    ref = llama_grid(w, qtype)
    assert _out_mse(x, w, g) < 0.8 * _out_mse(x, w, ref)


def test_gptq_llama_cpp_rounding_needs_a_block_grid():
    with pytest.raises(LeanfmError, match="block grid"):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), 3, 32, True, rounding="llama.cpp")


@pytest.mark.parametrize("group,sym,act_order", [(None, True, False), (32, False, True), (32, False, False)])
def test_gptq_keeps_pruned_weights_at_zero(group, sym, act_order):
    torch.manual_seed(0)
    w = torch.nn.Linear(128, 64, bias=False).weight.detach().clone()
    w[torch.rand_like(w) < 0.5] = 0.0  # an earlier pruning step
    x = _fixed_inputs()
    acc = HessianAccumulator(128)
    acc.add(x)
    g = gptq_quantize(w, acc.H, 4, group, sym, act_order=act_order)
    deq = dequantize(g.codes, g.scale, g.zero, g.group_size)
    assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))  # the sparsity survives
    # half the weights are pinned, so less freedom to compensate than dense GPTQ (< 0.8 there): still >10% better
    assert _out_mse(x, w, g) < 0.9 * _out_mse(x, w, rtn_quantize(w, 4, group, sym))


def test_gptq_with_identity_hessian_and_no_damp_is_rtn():
    # With H = I the OBS update never moves other columns: GPTQ reduces to RTN (per-channel grid).
    w = torch.randn(16, 64)
    g = gptq_quantize(w, torch.eye(64), 4, None, True, damp=0.0)
    assert torch.equal(g.codes, rtn_quantize(w, 4, None, True).codes)


def test_gptq_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(LeanfmError, match="bits=9"):
        gptq_quantize(w, torch.eye(16), 9)
    with pytest.raises(LeanfmError, match="damp"):
        gptq_quantize(w, torch.eye(16), 4, damp=1.5)
    with pytest.raises(LeanfmError, match="H \\[in, in\\]"):
        gptq_quantize(w, torch.eye(8), 4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_layerwise_runner_reproduces_the_model(make):
    model = make()
    ids = torch.randint(3, 250, (2, 24))
    runner = LayerwiseRunner(model, ids)
    for i in range(len(runner.layers)):
        runner.hidden = runner.run_layer(i)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        final = model.model.norm(runner.hidden)
    assert torch.allclose(final, ref, atol=1e-4, rtol=1e-4)


def test_linears_with_one_input_share_one_hessian():
    """q/k/v and gate/up see the same input: GPTQ accumulates one Hessian per input, equal to what
    each linear would have accumulated alone."""
    model = tiny_llama()
    ids = torch.randint(3, 250, (3, 24))
    runner = LayerwiseRunner(model, ids)
    layer = runner.layers[0]
    mods = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    shared = runner.collect_inputs(0, mods, lambda m: HessianAccumulator(m.in_features), share_equal_inputs=True)
    alone = runner.collect_inputs(0, mods, lambda m: HessianAccumulator(m.in_features))
    assert shared["self_attn.q_proj"] is shared["self_attn.k_proj"] is shared["self_attn.v_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    assert len({id(h) for h in shared.values()}) == 4 and len({id(h) for h in alone.values()}) == 7
    for n in mods:
        assert shared[n].n == alone[n].n == 3 * 24 and torch.equal(shared[n].H, alone[n].H), n


def test_gptq_on_tiny_model_packs_layers_and_stays_close():
    model = tiny_llama()
    ids = torch.randint(3, 250, (4, 64))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    leanfm.apply_(model, {"method": "gptq", "bits": 8, "group_size": None, "symmetric": True}, calib=ids)
    qls = list(quantized_layers(model).values())
    assert len(qls) == 2 * 7 and all(q.backend.name == "int8pack" for q in qls)
    step = model.leanfm_info["steps"][-1]
    assert step["simulated"] is False and "int8pack" in step["kernel"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("calib,match", [
    (torch.zeros(0, 0, dtype=torch.long), "empty or missing"),
    (torch.randint(3, 250, (1, 16)), "only 16 tokens"),
])
def test_gptq_refuses_empty_or_short_calibration(calib, match):
    with pytest.raises(LeanfmError, match=match):
        leanfm.apply_(tiny_llama(), {"method": "gptq", "bits": 4}, calib=calib)


@pytest.mark.parametrize("second", ["rtn", "gptq"])
def test_quantizing_an_already_quantized_model_is_refused(second):
    model = tiny_llama()
    leanfm.apply_(model, {"method": "rtn", "bits": 4, "group_size": 32}, calib=None)
    with pytest.raises(LeanfmError, match="already quantized"):
        leanfm.apply_(model, {"method": second, "bits": 4}, calib=torch.randint(3, 250, (4, 128)))


def test_calibration_longer_than_the_context_is_refused():
    with pytest.raises(LeanfmError, match="exceed the model's context of 512; lower --calib-seqlen"):
        leanfm.apply_(tiny_llama(), {"method": "gptq", "bits": 4}, calib=torch.randint(3, 250, (1, 600)))
