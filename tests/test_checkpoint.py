"""Packed checkpoints: leanfm format reloads without calibration; compressed-tensors export reloads
in plain transformers with the same logits as leanfm's quantized model."""
from __future__ import annotations

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import load_quantized, quantized_layers, save_quantized
from leanfm.kernels.lowrank import LowRankLinear
from leanfm.models.checkpoint import load_checkpoint, save_checkpoint
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

    model = leanfm.apply_(tiny_llama(), {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "backend": "reference"},
                          calib=torch.randint(3, 250, (4, 64)))
    save_checkpoint(model, tmp_path, fmt="compressed-tensors")
    other = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 24))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, other(input_ids=ids).logits
    # reference backend = exact fp32 dequant on both sides; only summation order may differ
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("cfg,files", [
    ({"method": "rtn", "bits": 4, "group_size": 32}, {"leanfm-quant.json"}),
    ({"method": "svd", "param_ratio": 0.6}, {"leanfm-lowrank.json"}),
    ({"method": "magnitude", "sparsity": 0.5}, set()),
], ids=["quant", "lowrank", "plain"])
def test_save_checkpoint_picks_the_format_and_load_checkpoint_its_loader(cfg, files, tmp_path):
    model = leanfm.apply_(tiny_llama(), cfg)
    save_checkpoint(model, tmp_path)
    manifests = {p.name for p in tmp_path.glob("leanfm-*.json")}
    assert manifests == files and (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    back = load_checkpoint(tmp_path)
    assert len(quantized_layers(back)) == len(quantized_layers(model))
    assert sum(isinstance(m, LowRankLinear) for m in back.modules()) == sum(isinstance(m, LowRankLinear) for m in model.modules())
    ids = torch.randint(3, 250, (1, 16))
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_compressed_tensors_needs_packed_layers(tmp_path):
    with pytest.raises(LeanfmError, match="recipe x leaves no packed quantized layers"):
        save_checkpoint(tiny_llama(), tmp_path, fmt="compressed-tensors", source="recipe x")
