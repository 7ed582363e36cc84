"""Measurement core on tiny models and stubs: exact values against hand computations."""
import math
import types

import pytest
import torch
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.measure import memory as mem
from leanfm.measure.flops import flops_per_token, linear_flops_per_token
from leanfm.measure.protocol import Protocol
from leanfm.measure.quality import evaluate, make_windows
from leanfm.measure.run import measure
from leanfm.measure.speed import decode_benchmark
from tests.conftest import tiny_llama


class FixedLogits(nn.Module):
    """Stub LM: logits depend only on position parity, so perplexity has a closed form."""

    def __init__(self, vocab=8):
        super().__init__()
        self.vocab = vocab
        self.config = types.SimpleNamespace(model_type="stub")

    def forward(self, input_ids, use_cache=False, **_):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        logits[..., 0] = math.log(3.0)  # p(token 0) = 3 / (3 + vocab - 1)
        return types.SimpleNamespace(logits=logits)


def test_windows_counts_and_bos():
    ids = torch.arange(100)
    w = make_windows(ids, 10, None, None)
    assert w.shape == (10, 10) and torch.equal(w[1], torch.arange(10, 20))
    wb = make_windows(ids, 10, 45, bos_id=7)
    assert wb.shape == (5, 10) and (wb[:, 0] == 7).all() and torch.equal(wb[0, 1:], torch.arange(9))


def test_max_eval_tokens_below_one_window():
    with pytest.raises(LeanfmError, match="--max-eval-tokens 100 is smaller than one evaluation window"):
        make_windows(torch.arange(5000), 2048, 100, None)


def test_perplexity_closed_form_on_stub():
    vocab = 8
    ids = torch.tensor([0, 1] * 50)
    windows = make_windows(ids, 10, None, None)
    out = evaluate(FixedLogits(vocab), windows)
    p0 = 3 / (3 + vocab - 1)
    p1 = 1 / (3 + vocab - 1)
    # Each window of 10 scores 9 targets (positions 1..9): tokens 1,0,1,0,1,0,1,0,1.
    nll = -(5 * math.log(p1) + 4 * math.log(p0)) / 9
    assert out["eval_tokens"] == 90
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_perplexity_matches_manual_loss_and_self_fidelity():
    m = tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (256,))
    windows = make_windows(ids, 64, None, None)
    out = evaluate(m, windows, reference=m)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(m(w[None]).logits[0, :-1], w[1:], reduction="sum") for w in windows]
    assert out["perplexity"] == pytest.approx(math.exp(sum(losses).item() / (4 * 63)), rel=1e-5)
    assert out["top1_agreement"] == 1.0 and out["kl_to_baseline"] == pytest.approx(0.0, abs=1e-6)


def test_fidelity_drops_for_a_perturbed_model():
    m, ref = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(0))
    out = evaluate(m, make_windows(ids, 64, None, None), reference=ref)
    assert out["top1_agreement"] < 1.0 and out["kl_to_baseline"] > 1e-4


def test_kv_cache_bytes_equal_formula():
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2)
    prompt = torch.randint(0, 300, (2, 16))
    res = decode_benchmark(m, prompt, gen=5, repeats=1, warmup=0)
    head_dim = 64 // 4
    expected = 2 * 2 * 2 * 2 * (16 + 5) * head_dim * 4  # K,V x layers x batch x kv_heads x positions x dim x fp32
    assert mem.tensor_bytes(res["cache"]) == expected
    assert res["metrics"]["decode_tokens_per_s"] > 0 and res["details"]["decode_tokens_total"] == 10


def test_weight_bytes_counts_tied_once():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    n_tied = sum(p.numel() for p in tied.parameters())  # parameters() already dedups tied
    buffers = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert mem.weight_bytes(tied) == n_tied * 4 + buffers
    assert mem.weight_bytes(untied) == mem.weight_bytes(tied) + 300 * 64 * 4


def test_flops_hand_computed():
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=300)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128)  # q, k+v (2 kv heads x 16), o, mlp
    assert linear_flops_per_token(m) == 2 * (2 * per_layer + 64 * 300)
    assert flops_per_token(m, context=10) == 2 * (2 * per_layer + 64 * 300) + 4 * 2 * 4 * 16 * 10


def test_measure_all_groups_on_tiny_model():
    m = tiny_llama()
    tok = types.SimpleNamespace(bos_token_id=1)
    ids = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(0))
    res = measure(m, tok, Protocol(seqlen=64, prompt=8, gen=4, repeats=2, threads=1), ids=ids)
    mt = res["metrics"]
    for key in ("perplexity", "eval_tokens", "prefill_ms", "tpot_ms_p50", "tpot_ms_p90", "decode_tokens_per_s",
                "weight_bytes", "model_size_on_disk_bytes", "peak_rss_bytes", "kv_cache_bytes", "flops_per_token",
                "energy_j_per_token", "energy_source", "usd_per_million_tokens", "co2_g_per_million_tokens"):
        assert key in mt, key
    assert mt["tpot_ms_p90"] >= mt["tpot_ms_p50"] > 0
    assert res["flags"] == {"simulated": False, "kernel": "torch-dense-fp32"}
    assert mt["model_size_on_disk_bytes"] >= mt["weight_bytes"] - 4096


def test_bos_added_for_gemma_family():
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, vocab_size=300, max_position_embeddings=128)
    m = Gemma3ForCausalLM(cfg).eval()
    tok = types.SimpleNamespace(bos_token_id=2)
    ids = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(0))
    res = measure(m, tok, Protocol(seqlen=32, groups=("quality",), threads=1), ids=ids)
    assert res["details"]["bos_per_window"] is True
    assert res["metrics"]["eval_tokens"] == (200 // 31) * 31


def test_cost_from_profile():
    from leanfm.measure.cost import cost_metrics

    out = cost_metrics(10.0, 2.0, {"usd_per_hour": 3.6, "grid_gco2_per_kwh": 500, "power_w": 1})
    assert out["usd_per_million_tokens"] == pytest.approx(3.6 / 3600 / 10 * 1e6)
    assert out["co2_g_per_million_tokens"] == pytest.approx(2.0 * 1e6 / 3.6e6 * 500)


def test_flops_and_decode_bytes_count_packed_linears():
    import leanfm
    from leanfm.measure.flops import linear_flops_per_token
    from leanfm.measure.bandwidth import decode_weight_bytes, roofline_metrics

    dense = tiny_llama()
    q = leanfm.apply_(tiny_llama(), {"method": "rtn", "bits": 4, "group_size": 32})
    assert linear_flops_per_token(q) == linear_flops_per_token(dense)
    emb = dense.model.embed_tokens.weight.numel() * 4  # tied lm_head reads the embedding matrix
    proj = sum(p.numel() * 4 for n, p in dense.named_parameters() if n.endswith("proj.weight"))
    assert decode_weight_bytes(dense) == emb + proj
    qbytes = sum(t.untyped_storage().nbytes() for m in q.modules() if type(m).__name__ == "QuantLinear" for t in m.buffers())
    assert decode_weight_bytes(q) == emb + qbytes < decode_weight_bytes(dense)
    prof = {"memory_bandwidth_gbps": 10.0, "peak_gflops_fp32": 100.0}
    r = roofline_metrics(dense, tokens_per_s=1000.0, batch=1, flops_per_token=1e6, kv_bytes_mean=1e5, profile=prof)
    nbytes = emb + proj + 1e5
    assert r["achieved_gbps"] == pytest.approx(nbytes * 1000 / 1e9)
    assert r["roofline_fraction"] == pytest.approx(max(nbytes / 10e9, 1e6 / 100e9) * 1000)
    assert roofline_metrics(dense, 1000.0, 1, 1e6, 0, {}) == {}


def test_speed_uses_an_attached_kv_policy():
    import leanfm

    tok = types.SimpleNamespace(bos_token_id=1)
    ids = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(0))
    proto = Protocol(groups=("speed", "memory"), prompt=24, gen=8, repeats=1, threads=1)
    full = measure(tiny_llama(), tok, proto, ids=ids)["metrics"]["kv_cache_bytes"]
    m = leanfm.apply_(tiny_llama(), leanfm.StreamingLLMConfig(budget=8, sinks=2))
    bounded = measure(m, tok, proto, ids=ids)["metrics"]["kv_cache_bytes"]
    kv = 2 * 2 * (2 * 16 * 8 * 4)  # layers x (K, V) x kv heads x head_dim x 8 kept positions x fp32
    table = 24 * 16 * 4 * 2 + 8 * 4  # the shared RoPE cos/sin table for the 24-token prefill, + inv_freq
    assert full == 2 * 2 * (2 * 16 * 32 * 4) and bounded == kv + table  # 8 of 32 positions kept per layer


class _StubPolicy:
    """A decoding policy with a chosen cost per emitted token (no model call when ``delay`` is 0)."""

    def __init__(self, name: str, delay: float, accepted: int):
        self.name, self.delay, self.accepted = name, delay, accepted

    @staticmethod
    def metrics(stats):
        return {"acceptance_rate": sum(s["accepted"] for s in stats) / sum(s["proposed"] for s in stats)}

    def generate(self, model, input_ids, max_new_tokens, generator=None, eos_token_id=None):
        import time

        model(input_ids=input_ids, use_cache=True, logits_to_keep=1)  # a real policy prefills too: speed.py subtracts one
        time.sleep(self.delay * max_new_tokens)
        out = torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)
        return out, {"new_tokens": max_new_tokens, "proposed": 4, "accepted": self.accepted}


def test_speed_decodes_through_the_attached_policy():
    """The measured decode speed moves with the policy (a stub at 2 ms vs 20 ms per token), and
    the policy's own metrics are reported beside it."""
    torch.manual_seed(0)
    m = tiny_llama().eval()
    prompt = torch.randint(0, 256, (1, 8))
    speeds = {}
    for delay, accepted in ((0.002, 1), (0.02, 3)):
        m.leanfm_decoder = _StubPolicy("stub", delay, accepted)
        res = decode_benchmark(m, prompt, gen=6, repeats=2, warmup=0)
        speeds[delay] = res["metrics"]["decode_tokens_per_s"]
        assert res["metrics"]["acceptance_rate"] == accepted / 4
        assert res["details"]["decoding_policy"] == "stub"
        assert res["details"]["decode_tokens_total"] == 12
        assert mem.tensor_bytes(res["cache"]) > 0  # the target's cache from an untimed plain decode
    assert speeds[0.002] > 4 * speeds[0.02]
    assert speeds[0.02] < 1 / 0.02 * 1.05  # no faster than the stub's own sleep allows


def test_policy_speed_needs_batch_one():
    m = tiny_llama().eval()
    m.leanfm_decoder = _StubPolicy("stub", 0.0, 1)
    with pytest.raises(LeanfmError, match="--batch 1"):
        decode_benchmark(m, torch.randint(0, 256, (2, 8)), gen=2, repeats=1, warmup=0)
