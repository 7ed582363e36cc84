"""The static KV cache and the compiled decode step (models/compiled.py): the same tokens as eager
decoding with transformers' dynamic cache, rollback, bounds, and the timer's record of the path."""
import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.measure.speed import DecodeTimer
from leanfm.models.compiled import StaticDecoder

from .conftest import tiny_llama


def _greedy_static(dec: StaticDecoder, prompt: torch.Tensor, gen: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    dec.reset()
    logits = [dec.prefill(prompt)[:, -1]]
    toks = [logits[-1].argmax(-1, keepdim=True)]
    for _ in range(gen - 1):
        logits.append(dec.step(toks[-1])[:, -1])
        toks.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(toks, 1), logits


@torch.no_grad()
def _greedy_dynamic(model, prompt: torch.Tensor, gen: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(input_ids=prompt, use_cache=True)
    logits = [out.logits[:, -1]]
    toks = [logits[-1].argmax(-1, keepdim=True)]
    cache = out.past_key_values
    for _ in range(gen - 1):
        out = model(input_ids=toks[-1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
        toks.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(toks, 1), logits


@pytest.mark.parametrize("compiled", [False, True], ids=["static-eager", "static-compiled"])
def test_static_decoding_matches_dynamic_cache_decoding(compiled):
    model = tiny_llama(layers=2)
    prompt = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_toks, ref_logits = _greedy_dynamic(model, prompt, 6)
    dec = StaticDecoder(model, max_len=7 + 6, compile=compiled)
    for _ in range(2):  # a second sequence on the same (reset) cache decodes the same
        toks, logits = _greedy_static(dec, prompt, 6)
        assert torch.equal(toks, ref_toks)
        for a, b in zip(logits, ref_logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if compiled:
        assert dec.compile_seconds > 0 and "compiled" in dec.path


def test_decoders_sharing_the_forward_stay_apart_when_full_guard_checks_are_skipped():
    """After its first step a decoder skips dynamo's full guard check. Decoders of two models with
    the same structure and different weights, of a deeper model, and of the same model with a
    longer cache all compile the one LlamaForCausalLM.forward; stepped in turns, each still
    decodes its own model's tokens and logits."""
    a, b, deep = tiny_llama(layers=2, seed=0), tiny_llama(layers=2, seed=1), tiny_llama(layers=3, seed=2)
    prompt = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    cases = [(a, 12), (b, 12), (deep, 12), (a, 17)]
    refs = [_greedy_dynamic(m, prompt, 6) for m, _ in cases]
    decs = [StaticDecoder(m, max_len=n) for m, n in cases]
    assert all(d.skip_guards for d in decs)
    for d in decs:
        d.warm(prompt)
    for _ in range(2):
        got = [_greedy_static(d, prompt, 6) for d in decs]
        for (toks, logits), (rtoks, rlogits) in zip(got, refs):
            assert torch.equal(toks, rtoks)
            for x, y in zip(logits, rlogits):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    # the two same-shaped models do compute different logits, so a swapped graph input would show
    assert (refs[0][1][0] - refs[1][1][0]).abs().max() > 0.1
    # ids of a kind no graph saw (a strided [1, 1] slice): dynamo refuses under the skipping
    # stance, so the decoder compiles it like a first step and decodes the same
    d, toks = decs[0], refs[0][0]
    d.reset()
    d.prefill(prompt)
    before = d.compile_seconds
    strided = toks[:, :1].clone()
    assert strided.stride() != torch.zeros(1, 1, dtype=toks.dtype).stride()
    torch.testing.assert_close(d.step(strided)[:, -1], refs[0][1][1], rtol=1e-4, atol=1e-4)
    assert d.compile_seconds > before


def test_crop_rolls_back_to_a_prefix():
    model = tiny_llama(layers=2)
    prompt = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    dec = StaticDecoder(model, max_len=12, compile=False)
    dec.prefill(prompt)
    first = dec.step(torch.tensor([[7, 8, 9]]))  # three tokens, then roll two of them back
    dec.crop(6)
    again = dec.step(torch.tensor([[8, 9]]))
    torch.testing.assert_close(again, first[:, 1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        dec.crop(dec.pos + 1)


def test_overflowing_the_static_cache_is_a_one_line_error():
    dec = StaticDecoder(tiny_llama(layers=1), max_len=4, compile=False)
    dec.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(LeanfmError, match="holds 4 positions; 3 are used and 2 more"):
        dec.step(torch.tensor([[1, 2]]))


def test_timer_records_the_compiled_path_and_keeps_eager_tokens():
    model = tiny_llama(layers=2)
    prompt = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    timer = DecodeTimer(model, prompt, gen=5, compile=True)
    assert timer.static is not None and timer.fallback is None
    timer.repeat(record=True)
    res = timer.result()
    assert res["details"]["decode_path"].startswith("compiled")
    assert res["metrics"]["compile_seconds"] > 0
    assert "compile_fallback" not in res["details"]
    eager = DecodeTimer(model, prompt, gen=5)
    eager.repeat()
    assert eager.result()["details"]["decode_path"].startswith("eager")
    assert "compile_seconds" not in eager.result()["metrics"]


def test_timer_falls_back_to_eager_for_a_kv_cache_policy_and_says_why():
    model = tiny_llama(layers=1)

    class Policy:
        method = "streamingllm"

    model.leanfm_kv_policy = Policy()
    timer = DecodeTimer(model, torch.tensor([[4, 5, 6]]), gen=2, compile=True)
    assert timer.static is None and "streamingllm" in timer.fallback



@pytest.mark.parametrize("backend", ["cpp-int4", "tinygemm-int4", "int8pack"])
def test_packed_kernels_compile_into_the_decode_graph(backend):
    """Packed int4/int8 layers trace as single operators (cpp-int4 through leanfm::int4_gemv):
    the compiled step decodes the same tokens as the eager one."""
    import leanfm
    from leanfm.kernels import backends

    bits = 8 if backend == "int8pack" else 4
    spec = {"method": "rtn", "bits": bits, "group_size": None if bits == 8 else 64, "symmetric": bits == 8, "backend": backend}
    if backends.get(backend).unsupported(backends.Layout(bits, spec["group_size"] or 128, 128, 128), spec["symmetric"]):
        pytest.skip(f"{backend} is unavailable here")
    model = leanfm.apply_(tiny_llama(hidden=128, inter=256), spec)
    prompt = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    eager_toks, _ = _greedy_static(StaticDecoder(model, 12, compile=False), prompt, 5)
    dec = StaticDecoder(model, 12, compile=True)
    toks, _ = _greedy_static(dec, prompt, 5)
    assert torch.equal(toks, eager_toks)
    assert dec.compile_seconds > 0


def test_a_fused_group_calls_its_kernel_once_per_compiled_step():
    """Without graph_cse each of q, k, v would run the whole fused q/k/v GEMV: 7 calls per layer, not 4."""
    import leanfm
    from leanfm.kernels import cpp_int4

    if isinstance(cpp_int4.load(), str):
        pytest.skip("cpp-int4 is unavailable here")
    model = leanfm.apply_(tiny_llama(hidden=128, inter=256, layers=2),
                          {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False, "backend": "cpp-int4"})
    dec = StaticDecoder(model, 12)
    dec.prefill(torch.tensor([[5, 6, 7]]))
    dec.step(torch.tensor([[8]]))  # compiles
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        dec.step(torch.tensor([[9]]))
    calls = sum(e.count for e in p.key_averages() if e.key == "leanfm::int4_gemv")
    assert calls == 2 * 4  # per layer: q/k/v fused, o, gate/up fused, down


@pytest.mark.parametrize("compiled", [False, True], ids=["static-eager", "static-compiled"])
def test_static_stepper_and_its_skip_view_match_the_dynamic_steppers(compiled):
    """The static (compiled) steppers give the logits of ModelStepper, for the full model and for
    the layer-skip draft view, through a rollback; the view leaves the model untouched."""
    from leanfm.methods.decoding.steppers import ModelStepper, StaticStepper, common_prefix
    from leanfm.methods.layers import decoder_layers

    model = tiny_llama(layers=4)
    n_before = len(decoder_layers(model))
    for skip in ([], [1, 2]):
        ref, st = ModelStepper(model, skip), StaticStepper(model, 16, skip, compile=compiled)
        for s in (ref, st):
            s.max_rollback = 4
            s.reset()
        seqs = [[5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 12], [5, 6, 7, 8, 9, 12, 13]]
        for toks in seqs:
            fed = len(toks) - min(common_prefix(st.tokens, toks), len(toks) - 1)  # all new positions' logits
            torch.testing.assert_close(st.sync(toks, last=fed), ref.sync(toks, last=fed), rtol=1e-4, atol=1e-4)
    assert len(decoder_layers(model)) == n_before and model.config.num_hidden_layers == n_before


def test_self_speculative_on_compiled_steppers_emits_plain_greedy_tokens():
    from leanfm.methods.decoding.drafts import ModelDraft
    from leanfm.methods.decoding.speculative import plain_generate, speculative_generate
    from leanfm.methods.decoding.steppers import StaticStepper

    model = tiny_llama(layers=4)
    prompt = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    ref, _ = plain_generate(model, prompt, 8)
    target = StaticStepper(model, 6 + 8 + 4)
    draft = ModelDraft(StaticStepper(model, 6 + 8 + 4, skip=[1, 2]), name="self")
    out, stats = speculative_generate(target, draft, prompt, 8, k=3)
    assert torch.equal(out, ref)
    assert stats["proposed"] > 0


def test_bench_compile_records_the_path_and_compile_time(tiny_model_dir, tiny_text, tmp_path, capsys):
    """`leanfm bench --compile`: baseline compiled; self-speculative through compiled steppers;
    early exit falls back to eager and the run says why."""
    import json

    from .test_runtimes import FAST, run_cli

    spec, ee = tmp_path / "spec.yaml", tmp_path / "ee.yaml"
    spec.write_text("name: spec\nseed: 0\nsteps:\n  - {method: speculative, draft: self, k: 2, skip_layers: [1]}\n")
    ee.write_text("name: ee\nseed: 0\nsteps:\n  - {method: early_exit, threshold: 0.5, min_layer: 0}\n")
    out = tmp_path / "c"
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--metrics", "speed",
                            "--recipe", "baseline", "--recipe", str(spec), "--recipe", str(ee),
                            "--compile", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["compile"] is True
    base, sp, early = res["runs"]
    for run in (base, sp):
        assert run["details"]["decode_path"].startswith("compiled"), run["details"]
        assert run["metrics"]["compile_seconds"] > 0
    assert "acceptance_rate" in sp["metrics"]
    assert early["details"]["decode_path"].startswith("eager") and "compile_seconds" not in early["metrics"]
    assert "early_exit has no compiled path" in early["details"]["compile_fallback"]


def test_one_row_fp32_matmuls_run_on_leanfm_gemv_and_decode_the_same():
    """At batch 1 each linear (7 per layer and the head; q/k/v with biases on a Qwen2-like config)
    becomes one leanfm::f32_gemv call in the compiled graph; the tokens and logits stay those of
    the dynamic-cache decode, and own_gemv=False keeps aten's mm."""
    from torch.profiler import ProfilerActivity, profile

    from leanfm.kernels import cpp_gemv

    if isinstance(cpp_gemv.load(), str):
        pytest.skip(f"cpp-gemv unavailable here: {cpp_gemv.load()}")
    model = tiny_llama(layers=2, hidden=72)
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    ref_toks, ref_logits = _greedy_dynamic(model, prompt, 6)
    dec = StaticDecoder(model, max_len=13)
    patch = torch._inductor.config.patch(fx_graph_cache=False)  # a cached graph skips the pass: this test counts rewrites
    with patch:
        toks, logits = _greedy_static(dec, prompt, 6)
    assert torch.equal(toks, ref_toks)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert dec.gemv_pass.rewrites == 2 * 7 + 1 and "leanfm's C++ GEMV" in dec.path
    dec.reset()
    dec.prefill(prompt)
    with patch:
        dec.step(toks[:, :1].clone())
        with profile(activities=[ProfilerActivity.CPU]) as p:
            dec.step(toks[:, 1:2].clone())
    assert sum(e.count for e in p.key_averages() if e.key == "leanfm::f32_gemv") == 2 * 7 + 1
    off = StaticDecoder(model, max_len=13, own_gemv=False)
    assert torch.equal(_greedy_static(off, prompt, 6)[0], ref_toks) and off.gemv_pass.rewrites == 0
    assert "GEMV" not in off.path


def test_the_gemv_rewrite_keeps_a_linear_bias():
    """addmm(b, x, W^T) becomes f32_gemv(x, W, b): a Qwen2-style q/k/v bias survives the rewrite."""
    from leanfm.kernels import cpp_gemv

    if isinstance(cpp_gemv.load(), str):
        pytest.skip(f"cpp-gemv unavailable here: {cpp_gemv.load()}")
    from leanfm.kernels.gemv_pass import DecodeGraphPass

    lin = torch.nn.Linear(20, 13)
    x = torch.randn(1, 20)
    p = DecodeGraphPass([], 1)
    f = torch.compile(lin, fullgraph=True, options={"post_grad_custom_pre_pass": p, "fx_graph_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(f(x), lin(x), rtol=1e-5, atol=1e-5)
        assert p.rewrites == 1
        x3 = torch.randn(3, 20)  # three rows: a GEMM, left to inductor
        torch.testing.assert_close(f(x3), lin(x3), rtol=1e-5, atol=1e-5)
        assert p.rewrites == 1
