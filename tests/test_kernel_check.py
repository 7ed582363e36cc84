"""Decode-kernel self-check: decode kernels against the reference path of the same packed weights."""
from __future__ import annotations

import json

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels import backends as B
from leanfm.measure import kernel_check as K

from .conftest import tiny_llama

INT8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "backend": "int8pack"}


def _int4(backend: str) -> dict:
    return {"method": "rtn", "bits": 4, "group_size": 32, "backend": backend}


def _need(backend: str) -> None:
    if backend == "cpp-int4":
        from leanfm.kernels import cpp_int4

        op = cpp_int4.load()
        if isinstance(op, str):
            pytest.skip(f"cpp-int4 unavailable on this machine: {op}")


def _model(step: dict | None = None, seed: int = 0):
    """Tiny random Llama whose logits have clear margins: a random model's logits are nearly
    uniform (std ~0.15), so the LM head is scaled up (std ~8) and a wrong token shows as a gap of
    several logits, as on a real model."""
    m = tiny_llama(tie=False, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
    if step is not None:
        leanfm.apply_(m, step)
    return m


def _prompts(n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _corrupt(monkeypatch, cls) -> None:
    """Store ``qweight`` with its rows rolled by one and make ``codes`` undo it: the dequant
    (prefill / perplexity) path sees the right weights, the decode kernel a wrong layout."""
    pack, codes = cls.pack, cls.codes

    def bad_pack(self, qw):
        bufs = pack(self, qw)
        bufs["qweight"] = bufs["qweight"].roll(1, 0).contiguous()
        return bufs

    def undo(self, bufs, lay):
        return codes(self, {**bufs, "qweight": bufs["qweight"].roll(-1, 0)}, lay)

    monkeypatch.setattr(cls, "pack", bad_pack)
    monkeypatch.setattr(cls, "codes", undo)
    # rows rolled across the whole matrix are no longer row-first: neither fusion nor the chunked
    # dense path may slice or concatenate them as stored
    monkeypatch.setattr(cls, "rows_first", False)


def test_needs_decode_check():
    assert not K.needs_decode_check(_model())
    assert not K.needs_decode_check(_model(_int4("reference")))  # dequant + dense GEMM at every size
    assert K.needs_decode_check(_model(INT8))
    from leanfm.kernels.sparse import SparseLinear

    m = _model({"method": "magnitude", "sparsity": 0.6, "backend": "csr"})
    assert any(isinstance(x, SparseLinear) for x in m.modules())
    assert not K.needs_decode_check(m)  # CSR runs one path for every input size


@pytest.mark.parametrize("backend", ["int8pack", "tinygemm-int4", "cpp-int4"])
def test_real_backends_pass(backend):
    _need(backend)
    m = _model(INT8 if backend == "int8pack" else _int4(backend))
    assert set(K._kernel_backends(m)) == {backend}
    res = K.check_decode_kernel(m, _prompts(), gen=6)
    json.dumps(res)  # JSON-safe
    assert res["tokens_checked"] == 18 and res["prompts"] == 3 and res["hard_mismatches"] == 0
    assert all(g <= res["tolerance"] for g in res["disagreement_gaps"])  # only tolerated near-ties
    assert res["token_agreement"] >= 1 - len(res["disagreement_gaps"]) / 18
    assert res["backends"] == {backend: 14} and backend in res["kernel"]
    assert res["max_abs_logit_diff"] < 0.5  # bf16 rounding at most, far below the tolerance


def test_smoothquant_per_token_activations_pass():
    m = _model()
    calib = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    leanfm.apply_(m, {"method": "smoothquant", "bits": 8, "alpha": 0.5, "act_bits": 8}, calib)
    assert K.needs_decode_check(m)
    res = K.check_decode_kernel(m, _prompts(), gen=6)
    assert res["hard_mismatches"] == 0 and res["max_abs_logit_diff"] < 0.5


@pytest.mark.parametrize("backend", ["int8pack", "tinygemm-int4", "cpp-int4"])
def test_corrupted_packed_layout_is_caught(monkeypatch, backend):
    _need(backend)
    step = INT8 if backend == "int8pack" else _int4(backend)
    ids = _prompts(2, 24)
    clean = _model(step)
    K.check_decode_kernel(clean, _prompts(), gen=6)
    with torch.no_grad():
        want = clean(input_ids=ids).logits
    _corrupt(monkeypatch, type(B.get(backend)))  # (the class's methods: from here on, for `bad` only)
    bad = _model(step)
    with torch.no_grad():  # the prefill path (what perplexity sees) is exactly right ...
        assert torch.allclose(bad(input_ids=ids).logits, want, atol=1e-4)
    with pytest.raises(LeanfmError) as e:  # ... the decode kernel is not
        K.check_decode_kernel(bad, _prompts(), gen=6)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("decode-kernel check failed", backend, "prompt 0, step ", "decoded token", "reference",
                 f"> tolerance {K.TOLERANCE}", "backend: reference", "/proc/cpuinfo"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("policy,alarms", [
    ({"method": "streaming_llm", "budget": 6, "sinks": 2}, True),  # decode sees 6 of 16+ positions
    ({"method": "kv_quant", "bits": 4, "group_size": 16}, False),  # int4 KV: logits move, no flip here
])
def test_kv_and_decoding_policies_are_bypassed(monkeypatch, policy, alarms):
    m = _model(INT8)
    leanfm.apply_(m, policy)
    leanfm.apply_(m, {"method": "speculative", "draft": "prompt_lookup"})
    assert m.leanfm_kv_policy is not None and m.leanfm_decoder is not None
    res = K.check_decode_kernel(m, _prompts(), gen=6)
    assert res["hard_mismatches"] == 0 and res["max_abs_logit_diff"] < 0.5
    # The policy does change decoding on purpose: the same check through it would see that.
    from leanfm.methods.kvcache.policies import make_cache

    monkeypatch.setattr(K, "_plain_cache", make_cache)
    if alarms:
        with pytest.raises(LeanfmError, match="decode-kernel check failed"):
            K.check_decode_kernel(m, _prompts(), gen=6)
    else:
        through = K.check_decode_kernel(m, _prompts(), gen=6)
        assert through["max_abs_logit_diff"] > 5 * res["max_abs_logit_diff"]


def test_prompt_must_reach_the_dense_path():
    m = _model(INT8)
    with pytest.raises(LeanfmError, match=f"prompt \\+ gen > {B.DECODE_MAX_TOKENS}"):
        K.check_decode_kernel(m, _prompts(2, 8), gen=8)
    res = K.check_decode_kernel(m, _prompts(1, 12)[0], gen=5)  # a single [L] prompt is accepted
    assert res["prompts"] == 1 and res["tokens_checked"] == 5


def test_check_leaves_model_state_alone():
    m = _model(INT8)
    leanfm.apply_(m, {"method": "streaming_llm", "budget": 6, "sinks": 2})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.set_grad_enabled(True)
    K.check_decode_kernel(m, _prompts(), gen=4)
    assert torch.is_grad_enabled() and m.leanfm_kv_policy is not None and not m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
