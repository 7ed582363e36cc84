"""Fine-tuning methods on tiny random models: the math against closed forms, the steps lower the
loss on a fixed batch, merged adapters equal unmerged ones, and bad settings are one line."""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import leanfm
from leanfm.config import config_from_dict
from leanfm.errors import LeanfmError
from leanfm.methods.tune.kd import kd_loss, next_token_loss
from leanfm.methods.tune.loop import lr_factor, train, training_windows
from leanfm.methods.tune.mezo import mezo_step, perturb_

from .conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune-llama")
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("train") / "train.txt"
    p.write_text(SAMPLE_TEXT * 4)
    return p


def _batch(model, n=2, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seqlen), generator=g)


# --- the math ---------------------------------------------------------------------------------

def test_kd_loss_is_t2_times_kl_and_trains_only_the_student():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11, requires_grad=True)
    T = 3.0
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    ref = T * T * (pt * (pt.log() - ps.log())).sum(-1).mean()
    got = kd_loss(s, t, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    assert s.grad is not None and t.grad is None
    assert kd_loss(t.detach(), t.detach(), T).abs().item() < 1e-6
    with pytest.raises(ValueError, match="same vocabulary"):
        kd_loss(s, t[..., :10], T)


def test_mezo_update_equals_its_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    params = [lin.weight, lin.bias]
    theta = [p.detach().clone() for p in params]
    loss = lambda: ((lin(x) - y) ** 2).mean().item()  # noqa: E731
    eps, lr, seed = 1e-3, 1e-2, 1234
    out = mezo_step(params, loss, eps, lr, seed)
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(p.shape, generator=g) for p in theta]

    def at(ps):
        return ((x @ ps[0].T + ps[1] - y) ** 2).mean().item()

    lp = at([t + eps * zz for t, zz in zip(theta, z)])
    lm = at([t - eps * zz for t, zz in zip(theta, z)])
    grad = (lp - lm) / (2 * eps)
    assert out["projected_grad"] == pytest.approx(grad, rel=1e-3, abs=1e-4)
    for p, t, zz in zip(params, theta, z):
        torch.testing.assert_close(p.detach(), t - lr * out["projected_grad"] * zz, rtol=0, atol=1e-6)


def test_chunked_loss_equals_the_plain_one():
    from leanfm.methods.tune.kd import chunked_next_token_loss

    model = tiny_llama(vocab=300)
    ids = _batch(model, n=2, seqlen=37)
    with torch.no_grad():
        plain = next_token_loss(model(ids).logits, ids)
    torch.testing.assert_close(chunked_next_token_loss(model, ids, chunk=8), plain, rtol=1e-5, atol=1e-6)


def test_perturbation_is_undone_by_its_negative():
    torch.manual_seed(0)
    ps = [torch.randn(5, 7), torch.randn(3)]
    ref = [p.clone() for p in ps]
    perturb_(ps, 0.01, 7)
    assert not torch.equal(ps[0], ref[0])
    perturb_(ps, -0.01, 7)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-7)


def test_a_large_parameter_is_perturbed_block_by_block_with_a_standard_normal():
    from leanfm.methods.tune.mezo import BLOCK

    p = torch.zeros(BLOCK + 4096)  # two blocks: one full, one of 4096
    perturb_([p], 1.0, 3)
    first, second = p[:BLOCK], p[BLOCK:]
    assert abs(float(first.mean())) < 0.01 and abs(float(first.std()) - 1) < 0.01
    assert not torch.equal(second, first[:4096])  # the second block draws on, it does not repeat
    again = torch.zeros_like(p)
    perturb_([again], 1.0, 3)
    assert torch.equal(again, p)  # the same seed, the same z
    perturb_([p], -1.0, 3)
    assert float(p.abs().max()) == 0.0


def test_windows_and_schedule():
    ids = torch.arange(100)
    w = training_windows(ids, 25, 10, seed=0)
    assert w.shape == (25, 10)
    assert sorted(w[:10, 0].tolist()) == list(range(0, 100, 10))  # one epoch: every window once
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3) and lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(9, 10, 0, "cosine") < 0.05 and lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(LeanfmError, match="fewer than one window"):
        training_windows(torch.arange(5), 1, 10, 0)


# --- steps lower the loss on a fixed batch ----------------------------------------------------

def _fixed_loss(model, batch) -> float:
    with torch.no_grad():
        return next_token_loss(model(batch, use_cache=False).logits, batch).item()


@pytest.mark.parametrize("method,extra", [
    ("full", {"lr": 1e-3}),
    ("lora", {"lr": 1e-2, "rank": 4}),
    ("dora", {"lr": 1e-2, "rank": 4}),
    ("mezo", {"lr": 2e-4, "eps": 1e-3}),
])
def test_a_step_lowers_the_loss_on_a_fixed_batch(method, extra):
    pytest.importorskip("peft")
    from leanfm.methods.tune.adapters import add_lora

    model = tiny_llama(vocab=300)
    steps = 200 if method == "mezo" else 20
    cfg = config_from_dict({"method": method, "steps": steps, "batch": 2, "seqlen": 32, "schedule": "constant", **extra})
    cfg.validate()
    batch = _batch(model)
    before = _fixed_loss(model, batch)
    spec = cfg.lora_spec()
    for p in model.parameters():
        p.requires_grad_(spec is None)
    target = add_lora(model, spec) if spec else model
    rec = train(target, cfg, batch.repeat(steps, 1), None)
    after = _fixed_loss(target, batch)
    assert after < before - 0.05, (before, after)
    assert len(rec["loss_curve"]) == steps and rec["train_tokens"] == steps * 2 * 32


def test_distillation_moves_the_student_towards_the_teacher():
    teacher = tiny_llama(vocab=300, seed=0)
    student = tiny_llama(vocab=300, seed=1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = config_from_dict({"method": "kd", "steps": 20, "batch": 2, "seqlen": 32, "lr": 1e-3, "schedule": "constant",
                            "hidden_weight": 0.5, "temperature": 2.0, "kd_weight": 1.0})  # pure KL
    batch = _batch(student)

    def gap():
        with torch.no_grad():
            return kd_loss(student(batch).logits, teacher(batch).logits, 2.0).item()

    before = gap()
    for p in student.parameters():
        p.requires_grad_(True)
    train(student, cfg, batch.repeat(20, 1), teacher)
    assert gap() < 0.5 * before


# --- merging ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_merged_adapters_compute_what_the_unmerged_ones_do(method):
    pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from leanfm.methods.tune.adapters import add_lora, merge, quantize_base_4bit

    torch.manual_seed(0)
    model = tiny_llama(vocab=300)
    cfg = config_from_dict({"method": method, "rank": 4})
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "qlora":
        assert quantize_base_4bit(model) == 2 * 7
    pm = add_lora(model, cfg.lora_spec())
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == pm.get_nb_trainable_parameters()[0]
    with torch.no_grad():  # adapters away from their zero init, so the merge has something to do
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = _batch(model)
    with torch.no_grad():
        ref = pm(x).logits
    merged = merge(pm)
    assert not any(type(m).__name__ in ("Linear4bit",) or hasattr(m, "lora_A") for m in merged.modules())
    with torch.no_grad():
        got = merged(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_keep_sparsity_keeps_pruned_weights_zero(tiny_dir, text_file):
    pytest.importorskip("peft")
    model, _ = leanfm.load(str(tiny_dir))
    leanfm.apply_(model, {"method": "magnitude", "sparsity": 0.5})
    w = model.model.layers[0].mlp.up_proj.weight
    zeros = (w == 0)
    leanfm.apply_(model, {"method": "lora", "steps": 3, "batch": 2, "seqlen": 16, "data": str(text_file), "rank": 4})
    info = model.leanfm_info["steps"][-1]["training"]
    assert info["kept_sparse_linears"] == 14 and torch.equal(model.model.layers[0].mlp.up_proj.weight == 0, zeros)
    assert info["trainable_params"] == info["trainable_params_peft"] > 0


# --- bad settings -----------------------------------------------------------------------------

@pytest.mark.parametrize("step,needle", [
    ({"method": "lora", "rank": 0}, "rank=0 must be a whole number > 0"),
    ({"method": "full", "steps": 0}, "steps=0 must be a whole number > 0"),
    ({"method": "kd", "lr": 0}, "lr=0 must be a number > 0"),
    ({"method": "lora", "lr": -1e-3}, "lr=-0.001 must be a number > 0"),
    ({"method": "mezo", "optimizer": "adamw"}, "must be sgd"),
    ({"method": "qlora", "quant_type": "int4"}, "quant_type='int4'"),
])
def test_bad_settings_are_one_line(step, needle):
    with pytest.raises(LeanfmError, match=None) as e:
        config_from_dict(step).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_target_matching_nothing_lists_the_names(tiny_dir, text_file):
    pytest.importorskip("peft")
    model, _ = leanfm.load(str(tiny_dir))
    with pytest.raises(LeanfmError) as e:
        leanfm.apply_(model, {"method": "lora", "targets": ["qkv"], "steps": 1, "data": str(text_file)})
    msg = str(e.value)
    assert "'qkv' matches no linear module" in msg and "q_proj" in msg and "down_proj" in msg and "\n" not in msg


def test_evaluation_text_is_refused_as_training_text(tiny_dir, tmp_path):
    from leanfm.data.text import load_text

    try:
        ev = load_text("wikitext2", "test")
    except LeanfmError:
        pytest.skip("WikiText-2 test not available here")
    model, _ = leanfm.load(str(tiny_dir))
    with pytest.raises(LeanfmError, match="data=wikitext2 is the evaluation text"):
        leanfm.apply_(model, {"method": "full", "steps": 1, "data": "wikitext2"})
    copy = tmp_path / "mine.txt"
    copy.write_text(SAMPLE_TEXT + ev[: len(ev) // 2])
    with pytest.raises(LeanfmError, match="of the sampled lines of WikiText-2 test"):
        leanfm.apply_(model, {"method": "full", "steps": 1, "data": str(copy)})


def test_kd_refuses_a_teacher_with_another_tokenizer(tiny_dir, tmp_path, text_file):
    other = tmp_path / "other"
    tok = tiny_tokenizer(vocab_size=280)
    tiny_llama(vocab=len(tok)).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    model, _ = leanfm.load(str(tiny_dir))
    with pytest.raises(LeanfmError, match="different tokenizers"):
        leanfm.apply_(model, {"method": "kd", "teacher": str(other), "steps": 1, "data": str(text_file)})


def test_kd_without_compression_would_distill_into_itself(tiny_dir, text_file):
    model, _ = leanfm.load(str(tiny_dir))
    with pytest.raises(LeanfmError, match="into itself"):
        leanfm.apply_(model, {"method": "kd", "steps": 1, "data": str(text_file)})


def test_packed_weights_are_refused(tiny_dir, text_file):
    model, _ = leanfm.load(str(tiny_dir))
    leanfm.apply_(model, {"method": "rtn", "bits": 8})
    with pytest.raises(LeanfmError, match="packed integer"):
        leanfm.apply_(model, {"method": "full", "steps": 1, "data": str(text_file)})


def test_a_missing_package_names_the_install_command(monkeypatch):
    import sys

    from leanfm.methods.tune import adapters

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(LeanfmError, match=r"pip install 'leanfm\[tune\]'"):
        adapters.require("bitsandbytes")


# --- leanfm tune ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(SAMPLE_TEXT * 2)
    return p


@pytest.fixture(scope="module")
def mag50(tmp_path_factory):
    p = tmp_path_factory.mktemp("recipe") / "mag50.yaml"
    p.write_text("name: mag50\nseed: 0\nsteps:\n  - {method: magnitude, sparsity: 0.5}\n")
    return p


def _tune(tiny_dir, text_file, eval_file, out, *extra) -> int:
    from leanfm import cli

    return cli.main(["tune", "--model", str(tiny_dir), "--steps", "4", "--batch", "2", "--seqlen", "16", "--data", str(text_file),
                     "--dataset", str(eval_file), "--eval-seqlen", "32", "--max-eval-tokens", "256", "--threads", "1",
                     "--out", str(out), *extra])


def test_tune_lora_measures_before_and_after_and_saves_a_merged_checkpoint(tiny_dir, text_file, eval_file, tmp_path, capsys):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from leanfm.measure.quality import evaluate, make_windows

    assert _tune(tiny_dir, text_file, eval_file, tmp_path / "run", "--method", "lora", "--rank", "4", "--lr", "1e-2") == 0
    out = capsys.readouterr().out
    assert "trained 8,192 parameters" in out and "peak RSS while training" in out
    from leanfm.results import read

    res = read(tmp_path / "run")
    base, tuned = res["runs"]
    m = tuned["metrics"]
    assert tuned["recipe"]["steps"][-1]["method"] == "lora" and m["trainable_params"] == 8192
    assert m["peak_train_rss_bytes"] > 0 and m["train_seconds"] > 0 and m["train_energy_j"] > 0
    assert len(tuned["details"]["training"]["loss_curve"]) == 4
    if platform.libc_ver()[0] == "glibc":  # the heap's freed transients go back to the OS while training
        assert tuned["details"]["training"]["malloc_mmap_threshold"] == 128 * 1024
    # the merged checkpoint loads in plain transformers and scores what leanfm measured
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint").eval()
    _, tok = leanfm.load(str(tiny_dir))
    from leanfm.data.calib import encode

    windows = make_windows(encode(tok, eval_file.read_text()), 32, 256, None)
    ppl = evaluate(hf, windows)["perplexity"]
    assert ppl == pytest.approx(m["perplexity"], rel=1e-4)
    assert ppl != pytest.approx(base["metrics"]["perplexity"], rel=1e-6)  # training changed the weights


def test_tune_after_a_recipe_reports_the_gap(tiny_dir, text_file, eval_file, mag50, tmp_path, monkeypatch):
    import json

    from leanfm.api import apply_ as real_apply
    from leanfm.training import run as run_mod

    applied = []
    monkeypatch.setattr(run_mod, "apply_", lambda m, s, **kw: (applied.append(s.method), real_apply(m, s, **kw))[1])
    assert _tune(tiny_dir, text_file, eval_file, tmp_path / "run", "--method", "full", "--recipe", str(mag50), "--no-save") == 0
    runs = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert [r["role"] for r in runs] == ["baseline", "compressed", "tuned"]
    assert [s["method"] for s in runs[2]["recipe"]["steps"]] == ["magnitude", "full"]
    assert runs[2]["details"]["training"]["kept_sparse_linears"] == 14
    assert applied == ["magnitude", "full"]  # the tuned run trains the compressed model; it does not compress again
    assert not (tmp_path / "run" / "checkpoint").exists()
    b, c, t = (r["metrics"]["perplexity"] for r in runs)
    if c > b:
        assert runs[2]["metrics"]["ppl_gap_recovered"] == pytest.approx((c - t) / (c - b))


@pytest.mark.parametrize("extra,needle", [
    (["--method", "full", "--rank", "4"], "--rank does not apply to --method full"),
    (["--method", "lora", "--rank", "0"], "rank=0 must be a whole number > 0"),
    (["--method", "lora", "--steps", "0"], "steps=0 must be a whole number > 0"),
    (["--method", "lora", "--lr", "-1"], "lr=-1.0 must be a number > 0"),
    (["--method", "rtn"], "rtn is not a fine-tuning method"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "lora", "--targets", "qkv"], "'qkv' matches no linear module"),
    (["--method", "full", "--data", "wikitext2"], "data=wikitext2 is the evaluation text"),
])
def test_tune_bad_input_is_one_line(tiny_dir, text_file, eval_file, tmp_path, capsys, extra, needle):
    pytest.importorskip("peft")
    code = _tune(tiny_dir, text_file, eval_file, tmp_path / "run", *extra)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
