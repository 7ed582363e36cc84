"""Packed checkpoints: leanfm format reloads without calibration; compressed-tensors export reloads
in plain transformers with the same logits as leanfm's quantized model."""
from __future__ import annotations

import pytest
import torch

import leanfm
from leanfm.kernels.checkpoint import load_quantized, quantized_layers, save_quantized
from tests.conftest import tiny_llama

CFGS = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "rtn", "bits": 8},
    {"method": "hqq", "bits": 4, "group_size": 32},
    {"method": "rtn", "bits": 3, "backend": "reference"},
]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c['method']}-{c['bits']}")
def test_leanfm_checkpoint_roundtrip(cfg, tmp_path):
    model = leanfm.apply_(tiny_llama(), cfg)
    ids = torch.randint(3, 250, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_quantized(model, tmp_path)
    back = load_quantized(tmp_path)
    q0, q1 = quantized_layers(model), quantized_layers(back)
    assert len(q0) == 14 and list(q0) == list(q1) and [m.backend.name for m in q0.values()] == [m.backend.name for m in q1.values()]
    for a, b in zip(q0.values(), q1.values()):
        qa, qb = a.quantized_weight(), b.quantized_weight()
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tie restored


def test_compressed_tensors_export_matches_leanfm_logits(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from leanfm.kernels.checkpoint import _dense_state, quantized_layers
    from leanfm.kernels.export_ct import export_compressed_tensors

    model = leanfm.apply_(tiny_llama(), {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "backend": "reference"},
                          calib=torch.randint(3, 250, (4, 64)))
    q = quantized_layers(model)
    export_compressed_tensors(model.config, _dense_state(model, q), {n: m.quantized_weight() for n, m in q.items()}, tmp_path)
    other = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 24))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, other(input_ids=ids).logits
    # reference backend = exact fp32 dequant on both sides; only summation order may differ
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
