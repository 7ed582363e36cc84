"""Decoding techniques: speculative decoding (stub models with fixed logits, real tiny models),
prompt lookup, CALM-style early exit with KV copies, configs and one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

import leanfm
from leanfm.config import config_from_dict
from leanfm.errors import LeanfmError
from leanfm.measure.decoding import measure_speedup
from leanfm.methods.decoding import (EarlyExitConfig, EarlyExitStepper, PromptLookupDraft, SpeculativeConfig, Stepper,
                                     check_compatible, early_exit_fidelity, early_exit_generate, generate_with_policy,
                                     lookup_continuation, plain_generate, self_draft, speculative_generate)
from leanfm.methods.decoding.drafts import ModelDraft
from leanfm.methods.decoding.speculative_math import probs_from_logits, residual_distribution, verify_greedy, verify_sampling
from tests.conftest import tiny_gemma3, tiny_llama, tiny_tokenizer

PROMPT = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(1))  # longer than Gemma3's window of 8


# ---------------------------------------------------------------------------------------------
# stub models with fixed logits
# ---------------------------------------------------------------------------------------------
class TableLM(Stepper):
    """Fixed logits: the next-token logits after a prefix are ``table[(last + 3 * len) % rows]``.

    Keeps its own 'cache' list and asserts that the stepper protocol crops and feeds it
    consistently (a rollback bug would trip the asserts or change the logits)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table.float()
        self.vocab_size = table.shape[1]
        self.cache: list[int] = []

    def key(self, prefix: list[int]) -> int:
        return (prefix[-1] + 3 * len(prefix)) % self.table.shape[0]

    def _reset(self):
        self.cache = []

    def _crop(self, keep):
        assert keep <= len(self.cache)
        self.cache = self.cache[:keep]

    def _feed(self, new, start, last):
        assert start == len(self.cache)
        self.cache = self.cache + list(new)
        rows = [self.key(self.cache[: i + 1]) for i in range(start, len(self.cache))]
        return self.table[rows[-last:]]

    def next_logits(self, prefix: list[int]) -> torch.Tensor:
        return self.table[self.key(prefix)]


V = 8
ROWS = 13
TARGET = torch.randn(ROWS, V, generator=torch.Generator().manual_seed(0)) * 2


def _shift_argmax(table: torch.Tensor) -> torch.Tensor:
    """A table whose argmax is never the given table's argmax (the draft is always rejected)."""
    out = torch.zeros_like(table)
    out[torch.arange(table.shape[0]), (table.argmax(1) + 1) % table.shape[1]] = 5.0
    return out


def _reference_greedy(table_lm: TableLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(table_lm.next_logits(seq).argmax()))
    return seq


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("n_new", [1, 7, 30])
def test_greedy_speculative_equals_greedy_never_always_partly(k, n_new):
    prompt = torch.tensor([[1, 5, 2]])
    ref = _reference_greedy(TableLM(TARGET), [1, 5, 2], n_new)
    plain, _ = plain_generate(TableLM(TARGET), prompt, n_new)
    assert plain[0].tolist() == ref
    partly = TARGET.clone()
    partly[::2] = _shift_argmax(TARGET)[::2]  # even rows disagree, odd rows agree
    rates = {}
    for name, draft_table in [("always", TARGET.clone()), ("never", _shift_argmax(TARGET)), ("partly", partly)]:
        out, st = speculative_generate(TableLM(TARGET), TableLM(draft_table), prompt, n_new, k=k)
        assert out[0].tolist() == ref, name
        assert st["new_tokens"] == n_new
        rates[name] = st["acceptance_rate"]
        if name == "never" and st["proposed"]:
            assert st["target_forward_calls"] == n_new  # one token per target forward
    if n_new > 1:
        assert rates["always"] == 1.0 and rates["never"] == 0.0
    if n_new == 30:
        assert 0.0 < rates["partly"] < 1.0


def test_always_accepted_uses_fewer_target_calls():
    out, st = speculative_generate(TableLM(TARGET), TableLM(TARGET.clone()), torch.tensor([[1, 2]]), 20, k=4)
    assert st["rounds"] == st["target_forward_calls"] == 4  # 5 tokens per round
    assert st["mean_accepted_length"] == 4.0 and st["tokens_per_round"] == 5.0


def test_verify_greedy_rules():
    logits = torch.eye(5)[[2, 3, 0, 1]]  # argmax per position: 2, 3, 0, 1
    assert verify_greedy([2, 3, 0], logits) == (3, 1)  # all accepted + bonus
    assert verify_greedy([2, 4, 0], logits) == (1, 3)  # first mismatch at 1, target's token there
    assert verify_greedy([4, 3, 0], logits) == (0, 2)
    assert verify_greedy([], logits[:1]) == (0, 2)


def test_probs_top_k_and_temperature():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0])
    p = probs_from_logits(logits, 1.0, top_k=2)
    assert p[1] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    assert torch.allclose(probs_from_logits(logits, 0.5), torch.softmax(logits * 2, -1))
    assert torch.equal(residual_distribution(p, p), p)


# ---------------------------------------------------------------------------------------------
# sampling: the output distribution is the target's (chi-square)
# ---------------------------------------------------------------------------------------------
def _chi2(observed: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and dof over cells with p > 0; cells expecting < 5 counts are pooled
    into one bin (the chi-square approximation needs it). Infinite if a p == 0 cell was sampled."""
    observed, probs = observed.flatten().double(), probs.flatten().double()
    n = observed.sum()
    zero = probs <= 0
    if observed[zero].sum() > 0:
        return math.inf, 1
    obs, exp = observed[~zero], probs[~zero] * n
    small = exp < 5
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
    return float(((obs - exp) ** 2 / exp).sum()), obs.numel() - 1


def _chi2_critical(dof: int, alpha: float) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1 - alpha, dof))
    except ImportError:  # Wilson-Hilferty approximation
        z = {1e-3: 3.0902, 1e-6: 4.7534}[alpha]
        return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _passes(observed, probs) -> bool:
    stat, dof = _chi2(observed, probs)
    return stat < _chi2_critical(dof, 1e-3)


def _rejects(observed, probs) -> bool:
    stat, dof = _chi2(observed, probs)
    return stat > _chi2_critical(dof, 1e-6)


P = torch.tensor([0.05, 0.30, 0.10, 0.02, 0.20, 0.08, 0.15, 0.10])
Q = torch.tensor([0.20, 0.05, 0.10, 0.25, 0.05, 0.20, 0.05, 0.10])


def test_rejection_sampling_first_token_matches_target_chi_square():
    g = torch.Generator().manual_seed(0)
    n = 20000
    target = torch.stack([P, torch.full((V,), 1.0 / V)])
    good, wrong_q, wrong_resample = torch.zeros(V), torch.zeros(V), torch.zeros(V)
    xs = torch.multinomial(Q, n, replacement=True, generator=g).tolist()
    for x in xs:
        n_acc, tok = verify_sampling([x], Q[None], target, generator=g)
        good[x if n_acc == 1 else tok] += 1  # first emitted token: the draft's if accepted
        wrong_q[x] += 1  # a wrong sampler: always accept the draft (= sample from q)
        # another wrong one: on rejection resample from p instead of the residual norm(max(0, p - q))
        accept = torch.rand((), generator=g).item() * Q[x] < P[x]
        wrong_resample[x if accept else int(torch.multinomial(P, 1, generator=g))] += 1
    assert _passes(good, P)
    assert _rejects(wrong_q, P), "the chi-square test cannot tell q from p"
    assert _rejects(wrong_resample, P), "the chi-square test cannot see a missing residual"


def test_point_mass_draft_keeps_distribution():
    """Prompt lookup proposes deterministically (q = point mass): still distributed as p."""
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(20000):
        n_acc, tok = verify_sampling([1], None, torch.stack([P, P]), generator=g)
        counts[1 if n_acc == 1 else tok] += 1
    assert _passes(counts, P)


def _joint(table_lm: TableLM, prompt: list[int], n: int, temperature: float, top_k) -> torch.Tensor:
    """Exact distribution of the next n tokens under the (processed) target: [V] * n tensor."""
    vocab = table_lm.vocab_size
    out = torch.zeros([vocab] * n, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(vocab)] * n).tolist() if n > 1 else [[i] for i in range(vocab)]:
        seq, pr = list(prompt), 1.0
        for t in idx:
            pr *= float(probs_from_logits(table_lm.next_logits(seq), temperature, top_k)[t])
            seq.append(t)
        out[tuple(idx)] = pr
    return out


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 3)])
def test_speculative_sampling_end_to_end_joint_distribution(temperature, top_k):
    """Three tokens, k=2, context-dependent stub tables over 4 tokens: the sampled joint
    (64 cells) equals the target's; sampling the draft directly is detected as wrong."""
    vocab, rows = 4, 7
    tt = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))
    dt = tt + torch.randn(rows, vocab, generator=torch.Generator().manual_seed(4)) * 1.5
    target, draft = TableLM(tt), TableLM(dt)
    prompt = [1, 2]
    n, n_new = 4000, 3
    g = torch.Generator().manual_seed(5)
    counts, draft_counts = torch.zeros([vocab] * n_new), torch.zeros([vocab] * n_new)
    acc = 0
    for _ in range(n):
        out, st = speculative_generate(target, draft, torch.tensor([prompt]), n_new, k=2, temperature=temperature,
                                       top_k=top_k, generator=g)
        counts[tuple(out[0, 2:].tolist())] += 1
        acc += st["accepted"]
        d, _ = plain_generate(draft, torch.tensor([prompt]), n_new, temperature=temperature, top_k=top_k, generator=g)
        draft_counts[tuple(d[0, 2:].tolist())] += 1
    joint = _joint(target, prompt, n_new, temperature, top_k)
    assert 0 < acc < 2 * n  # partly accepted
    assert _passes(counts.flatten(), joint.flatten())
    assert _rejects(draft_counts.flatten(), joint.flatten())


# ---------------------------------------------------------------------------------------------
# real tiny models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,skip", [(lambda: tiny_llama(layers=4), [1, 2]), (lambda: tiny_gemma3(layers=3), [1])])
def test_self_speculative_greedy_equals_plain_greedy(make, skip):
    m = make()
    ref, _ = plain_generate(m, PROMPT, 40)
    assert torch.equal(ref, m.generate(PROMPT, max_new_tokens=40, do_sample=False))  # independent reference
    for k in (1, 4):
        out, st = speculative_generate(m, self_draft(m, skip), PROMPT, 40, k=k)
        assert torch.equal(out, ref)
        assert st["draft_forward_calls"] > 0 and st["target_forward_calls"] < 40 + 1
        assert 0.0 <= st["acceptance_rate"] <= 1.0


def test_self_speculative_rolls_back_real_caches_often():
    """A draft skipping most layers is often rejected: the caches are cropped many times."""
    m = tiny_gemma3(layers=3)
    ref, _ = plain_generate(m, PROMPT, 40)
    out, st = speculative_generate(m, self_draft(m, [0, 2]), PROMPT, 40, k=5)
    assert torch.equal(out, ref)
    assert st["acceptance_rate"] < 0.5


def test_draft_model_greedy_and_sampling():
    target, draft = tiny_llama(layers=3, seed=0), tiny_llama(layers=1, seed=1)
    ref, _ = plain_generate(target, PROMPT, 25)
    out, st = speculative_generate(target, draft, PROMPT, 25, k=3)
    assert torch.equal(out, ref)
    out, st = speculative_generate(target, draft, PROMPT, 25, k=3, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 12 + 25) and st["new_tokens"] == 25


def test_prompt_lookup_greedy_equals_plain_greedy():
    m = tiny_llama(layers=2)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    ref, _ = plain_generate(m, prompt, 30)
    out, st = speculative_generate(m, PromptLookupDraft(ngram_max=3), prompt, 30, k=4)
    assert torch.equal(out, ref)
    assert st["proposed"] > 0 and st["draft_forward_calls"] == 0


def test_lookup_continuation():
    assert lookup_continuation([1, 2, 3, 4, 1, 2], 2) == [3, 4]
    assert lookup_continuation([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]  # bigram (2, 3) at 1
    assert lookup_continuation([1, 2, 3], 2) == []
    assert lookup_continuation([7, 7, 7, 7], 2) == [7]  # longest n-gram first, even with a short continuation


def test_eos_stops_generation():
    m = tiny_llama(layers=2)
    ref, _ = plain_generate(m, PROMPT, 20)
    eos = int(ref[0, 12 + 5])
    out, _ = speculative_generate(m, self_draft(m, [1]), PROMPT, 20, k=4, eos_token_id=eos)
    plain, _ = plain_generate(m, PROMPT, 20, eos_token_id=eos)
    assert torch.equal(out, plain) and int(out[0, -1]) == eos and out.shape[1] <= 12 + 6


# ---------------------------------------------------------------------------------------------
# early exit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=4), lambda: tiny_gemma3(layers=3)])
def test_early_exit_threshold_one_equals_full_model(make):
    m = make()
    ref, _ = plain_generate(m, PROMPT, 30)
    out, st = early_exit_generate(m, PROMPT, 30, threshold=1.0, min_layer=0)
    assert torch.equal(out, ref)
    assert st["mean_layers_used"] == st["n_layers"] and st["early_exit_rate"] == 0.0
    fid = early_exit_fidelity(m, ref, 12, threshold=1.0, min_layer=0)
    assert fid["top1_agreement"] == 1.0 and fid["scored_tokens"] == 30


def test_early_exit_low_threshold_uses_fewer_layers():
    m = tiny_llama(layers=4)
    out, st = early_exit_generate(m, PROMPT, 20, threshold=1e-6, min_layer=1, check_every=1)
    assert st["mean_layers_used"] == 2.0 and st["exits"] == {2: 19} and st["checks_per_token"] == 1.0
    _, st2 = early_exit_generate(m, PROMPT, 20, threshold=0.99, criterion="state", min_layer=0, check_every=2)
    assert st2["decode_steps"] == 19 and st2["mean_layers_used"] <= 4


class AlternatingExit(EarlyExitStepper):
    """Exits at the first checked layer on every other token: mixes copied and real KV."""

    def _confident(self, h_in, h_out):
        self.checks += 1
        return len(self.layers_used) % 2 == 0, (self.head_logits(h_out[:, -1:]).float())


@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=3), lambda: tiny_gemma3(layers=3)])
def test_early_exit_cache_runs_many_tokens(make):
    m = make()
    step = AlternatingExit(m, threshold=0.5, min_layer=0)
    out, _ = plain_generate(step, PROMPT, 60)
    st = step.stats()
    assert out.shape == (1, 72) and st["exits"] == {1: 30, 3: 29}
    for i, layer in enumerate(step.cache.layers):  # every layer holds every fed position (or its window)
        expect = layer.sliding_window - 1 if getattr(layer, "is_sliding", False) else 71
        assert layer.keys.shape[-2] == expect and layer.get_seq_length() == 71, i


def test_early_exit_copies_kv_from_the_exit_state():
    """Exit after layer 0 on every decode step: layer 1's cached K/V at those positions must be
    its k/v projections (+ rotary) of layer 0's output, i.e. of the full model's hidden_states[1]
    (layer 0 always runs fully, so its outputs are the full model's)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_llama(layers=2)
    step = EarlyExitStepper(m, threshold=1e-6, min_layer=0)
    out, _ = plain_generate(step, PROMPT, 10)
    assert step.stats()["exits"] == {1: 9}
    seq = out[:, :-1]  # the cache holds every token but the last
    with torch.no_grad():
        h1 = m(input_ids=seq, output_hidden_states=True).hidden_states[1]
        layer = m.model.layers[1]
        x = layer.input_layernorm(h1)
        attn = layer.self_attn
        T = seq.shape[1]
        k = attn.k_proj(x).view(1, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = m.model.rotary_emb(x, torch.arange(T)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    cached = step.cache.layers[1]
    dec = slice(12, T)  # decode positions (the prompt ran at full depth)
    torch.testing.assert_close(cached.keys[:, :, dec], k[:, :, dec], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.values[:, :, dec], v[:, :, dec], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# configs, handlers, policy
# ---------------------------------------------------------------------------------------------
def test_apply_self_speculative_policy():
    m = tiny_llama(layers=4)
    leanfm.apply_(m, {"method": "speculative", "draft": "self", "skip_layers": [1, 2], "k": 3})
    step = m.leanfm_info["steps"][-1]
    assert step["simulated"] is False and step["skip_layers"] == [1, 2] and "self-speculative" in step["kernel"]
    out, st = generate_with_policy(m, PROMPT, 20)
    ref, _ = plain_generate(m, PROMPT, 20)
    assert torch.equal(out, ref) and st["policy"] == "speculative"
    r = measure_speedup(m, PROMPT, 8, repeats=1, warmup=0)
    assert r["matches_plain"] and r["speedup"] > 0 and "acceptance_rate" in r


def test_apply_self_speculative_by_block_influence():
    m = tiny_llama(layers=4)
    calib = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = SpeculativeConfig(draft="self", skip_fraction=0.5)
    assert cfg.needs_calibration
    with pytest.raises(LeanfmError, match="calibration"):
        leanfm.apply_(tiny_llama(layers=4), cfg)
    leanfm.apply_(m, cfg, calib=calib)
    step = m.leanfm_info["steps"][-1]
    assert len(step["skip_layers"]) == 2 and len(step["block_influence"]) == 4
    out, _ = generate_with_policy(m, PROMPT, 15)
    assert torch.equal(out, plain_generate(m, PROMPT, 15)[0])


def test_apply_prompt_lookup_and_early_exit_and_only_one_policy():
    m = tiny_llama(layers=3)
    leanfm.apply_(m, {"method": "speculative", "draft": "prompt_lookup", "k": 2})
    out, st = generate_with_policy(m, PROMPT, 10)
    assert torch.equal(out, plain_generate(m, PROMPT, 10)[0]) and st["draft"] == "prompt_lookup"
    with pytest.raises(LeanfmError, match="already has a decoding policy"):
        leanfm.apply_(m, {"method": "early_exit", "threshold": 0.5})
    m2 = tiny_llama(layers=3)
    leanfm.apply_(m2, {"method": "early_exit", "threshold": 1e-6, "min_layer": 0})
    out, st = generate_with_policy(m2, PROMPT, 10)
    assert st["policy"] == "early_exit" and st["mean_layers_used"] == 1.0
    assert m2.leanfm_info["steps"][-1]["simulated"] is False


def test_plain_policy_without_attachment():
    m = tiny_llama(layers=2)
    out, st = generate_with_policy(m, PROMPT, 5)
    assert st["policy"] == "plain" and out.shape == (1, 17)


def test_draft_model_by_directory(tiny_model_dir):
    target, tok = leanfm.load(str(tiny_model_dir))
    leanfm.apply_(target, SpeculativeConfig(draft=str(tiny_model_dir), k=2))
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    out, st = generate_with_policy(target, ids, 10)
    assert torch.equal(out, plain_generate(target, ids, 10)[0]) and st["acceptance_rate"] == 1.0


# ---------------------------------------------------------------------------------------------
# bad input: one-line LeanfmError
# ---------------------------------------------------------------------------------------------
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_error_draft_vocab_mismatch():
    with pytest.raises(LeanfmError, match="tokenizer") as e:
        speculative_generate(tiny_llama(vocab=300), tiny_llama(vocab=256), PROMPT, 5)
    _one_line(e)
    with pytest.raises(LeanfmError, match="tokenizer") as e:
        check_compatible(tiny_llama(vocab=300), tiny_llama(vocab=256))
    _one_line(e)
    with pytest.raises(LeanfmError, match="tokenizer") as e:
        check_compatible(tiny_llama(), tiny_llama(), tiny_tokenizer(300), tiny_tokenizer(280))
    _one_line(e)


def test_error_draft_model_directory_with_other_tokenizer(tiny_model_dir, tmp_path):
    other = tiny_llama(vocab=280)
    other.save_pretrained(str(tmp_path))
    tiny_tokenizer(280).save_pretrained(str(tmp_path))
    target, _ = leanfm.load(str(tiny_model_dir))
    with pytest.raises(LeanfmError, match="tokenizer") as e:
        leanfm.apply_(target, SpeculativeConfig(draft=str(tmp_path)))
    _one_line(e)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, 1.5])
def test_error_threshold_outside_unit_interval(threshold):
    with pytest.raises(LeanfmError, match=r"\(0, 1\]") as e:
        config_from_dict({"method": "early_exit", "threshold": threshold})
    _one_line(e)
    with pytest.raises(LeanfmError, match=r"\(0, 1\]"):
        EarlyExitConfig(threshold=threshold).validate()
    with pytest.raises(LeanfmError, match=r"\(0, 1\]"):
        EarlyExitStepper(tiny_llama(layers=2), threshold=threshold)


def test_error_bad_k_and_skip_all_layers_and_others():
    with pytest.raises(LeanfmError, match="k=0") as e:
        config_from_dict({"method": "speculative", "draft": "prompt_lookup", "k": 0})
    _one_line(e)
    with pytest.raises(LeanfmError, match="k=0"):
        speculative_generate(tiny_llama(layers=2), PromptLookupDraft(), PROMPT, 5, k=0)
    m = tiny_llama(layers=3)
    with pytest.raises(LeanfmError, match="all 3 decoder layers") as e:
        leanfm.apply_(m, {"method": "speculative", "draft": "self", "skip_layers": [0, 1, 2]})
    _one_line(e)
    with pytest.raises(LeanfmError, match="all 3"):
        self_draft(m, [2, 1, 0])
    with pytest.raises(LeanfmError, match="out of range"):
        self_draft(m, [3])
    with pytest.raises(LeanfmError, match="only to draft: self"):
        config_from_dict({"method": "speculative", "draft": "prompt_lookup", "skip_fraction": 0.5})
    with pytest.raises(LeanfmError, match="min_layer"):
        leanfm.apply_(m, {"method": "early_exit", "threshold": 0.5, "min_layer": 2})
    with pytest.raises(LeanfmError, match="one sequence"):
        plain_generate(m, PROMPT.repeat(2, 1), 3)
    with pytest.raises(LeanfmError, match="criterion"):
        config_from_dict({"method": "early_exit", "criterion": "entropy"})
    with pytest.raises(LeanfmError, match="temperature"):
        speculative_generate(m, ModelDraft(TableLM(TARGET)), PROMPT, 3, temperature=-1.0)
