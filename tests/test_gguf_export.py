"""GGUF export of a tiny Llama: names, q/k permutation, leanfm's own codes in the blocks, refusals.
Loading the file in llama.cpp itself is checked where llama-cpp-python is installed."""
import numpy as np
import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import quantized_layers
from leanfm.models.gguf_export import _permute, export_gguf
from tests.conftest import tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")


def tiny(recipe=None, tie=False):
    tok = tiny_tokenizer()
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=len(tok), tie=tie)
    if recipe:
        leanfm.apply_(m, recipe)
    return m, tok


def read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def values(t, shape):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


@pytest.mark.parametrize("step,qtype", [
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, "q4_1"),
    ({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}, "q8_0"),
])
def test_packed_layers_keep_their_codes(tmp_path, step, qtype):
    m, tok = tiny(step)
    path = export_gguf(m, tok, tmp_path / "m.gguf", qtype)
    r, t = read(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert len(t) == 2 * 9 + 3  # 9 per layer, embedding, final norm, untied head
    packed = quantized_layers(m)
    for hf, name, heads in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 4),
                            ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2),
                            ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", None)]:
        ref = packed[hf].dequantized_weight()
        ref = _permute(ref, heads) if heads else ref
        got = values(t[name], ref.shape)
        assert t[name].tensor_type.name == qtype.upper()
        # the block stores the scale (and q4_1's offset) in fp16: that rounding is the only change
        assert np.abs(got - ref.numpy()).max() <= 2e-3 * float(ref.abs().max())
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_permutation_is_llama_cpps_rotary_layout():
    """Row r of head h in the half-split layout goes to interleaved position: (0, d/2, 1, d/2+1, ...)."""
    w = torch.arange(2 * 8).float().view(16, 1)  # 2 heads of 8 rows
    p = _permute(w, 2).view(-1).tolist()
    assert p[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and p[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_float_model_in_f32_round_trips_exactly(tmp_path):
    m, tok = tiny()
    _, t = read(export_gguf(m, tok, tmp_path / "f.gguf", "f32"))
    w = m.model.layers[0].mlp.up_proj.weight.detach()
    assert np.array_equal(values(t["blk.0.ffn_up.weight"], w.shape), w.numpy())


@pytest.mark.parametrize("step,qtype,needle", [
    ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}, "q4_0", "groups are 64 columns"),
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, "q4_0", "use q4_1"),
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "f16", "export them as q4_0"),
])
def test_grids_that_do_not_fit_are_refused(tmp_path, step, qtype, needle):
    m, tok = tiny(step)
    with pytest.raises(LeanfmError) as e:
        export_gguf(m, tok, tmp_path / "x.gguf", qtype)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=64)).eval()
    with pytest.raises(LeanfmError) as e:
        export_gguf(m, tiny_tokenizer(), tmp_path / "g.gguf", "f32")
    assert str(e.value) == "the GGUF writer does not know the architecture 'gpt2'; it writes: llama, qwen2, gemma3"
    assert not (tmp_path / "g.gguf").exists()


def types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.mark.parametrize("qtype,tie,embd,head,linear", [
    ("q4_0", True, "Q8_0", None, "Q4_0"),  # tied: the embedding is the head, Q8_0 as llama.cpp's quantizer writes it
    ("q4_1", True, "Q8_0", None, "Q4_1"),
    ("q8_0", True, "Q8_0", None, "Q8_0"),
    ("q4_0", False, "Q4_0", "Q8_0", "Q4_0"),  # untied: the embedding in the file type, the head Q8_0
    ("q4_1", False, "Q4_1", "Q8_0", "Q4_1"),
    ("f16", False, "F16", "F16", "F16"),
    ("f32", True, "F32", None, "F32"),
])
def test_float_tensors_are_typed_as_llama_cpps_quantizer_types_them(tmp_path, qtype, tie, embd, head, linear):
    m, tok = tiny(tie=tie)
    t = types(export_gguf(m, tok, tmp_path / "m.gguf", qtype))
    assert t["token_embd.weight"] == embd and t.get("output.weight") == head
    assert {t[f"blk.{i}.{n}.weight"] for i in range(2) for n in LINEARS} == {linear}
    assert {v for k, v in t.items() if "norm" in k} == {"F32"}


@pytest.mark.parametrize("tie", [True, False])
def test_an_explicit_float_type_overrides_all_but_norms(tmp_path, tie):
    m, tok = tiny(tie=tie)
    t = types(export_gguf(m, tok, tmp_path / "m.gguf", "q4_0", float_type="f16"))
    assert {v for k, v in t.items() if "norm" not in k} == {"F16"}
    assert {v for k, v in t.items() if "norm" in k} == {"F32"}


def test_packed_layers_beside_a_tied_head_in_q8_0(tmp_path):
    m, tok = tiny({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, tie=True)
    t = types(export_gguf(m, tok, tmp_path / "m.gguf", "q4_0"))
    assert t["token_embd.weight"] == "Q8_0" and "output.weight" not in t
    assert {t[f"blk.{i}.{n}.weight"] for i in range(2) for n in LINEARS} == {"Q4_0"}


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_export_and_agrees(tmp_path, qtype):
    """The file runs in llama.cpp itself (tokenizer from tokenizer.json) and its logits match the
    torch model's: exactly in f32; in q8_0 up to llama.cpp's own rounding of activations to 8 bits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    step = {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True} if qtype == "q8_0" else None
    m, tok = tiny(step)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # clear argmax margins on a random model
    path = export_gguf(m, tok, tmp_path / "m.gguf", qtype, float_type="f32")
    ids = torch.randint(3, 290, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if qtype == "f32" else 0.9)
    assert np.abs(got - ref).max() <= (1e-3 if qtype == "f32" else 0.1) * np.abs(ref).max()


def test_compress_writes_a_gguf_and_refuses_a_grid_that_does_not_fit(tiny_model_dir, tmp_path, capsys):
    from leanfm import cli

    recipe = tmp_path / "q40.yaml"
    recipe.write_text("name: rtn-g32\nseed: 0\nsteps:\n  - {method: rtn, bits: 4, group_size: 32, symmetric: true}\n")
    out = tmp_path / "gg"
    assert cli.main(["compress", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--format", "gguf",
                     "--out", str(out), "--threads", "1"]) == 0
    r, t = read(out / "model.gguf")
    assert t["blk.0.attn_q.weight"].tensor_type.name == "Q4_0" and (out / "recipe.yaml").exists()
    capsys.readouterr()
    code = cli.main(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--format", "gguf",
                     "--out", str(tmp_path / "bad"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written as q4_1" in err and "groups are 64 columns" in err and "group_size: 32" in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("recipe,qtype", [("gptq-q4_0", "Q4_0"), ("awq-q4_1", "Q4_1")])
def test_builtin_gguf_recipes_fit_their_block_type(tiny_model_dir, tiny_text, tmp_path, recipe, qtype):
    from leanfm import cli

    out = tmp_path / recipe
    assert cli.main(["compress", "--model", str(tiny_model_dir), "--recipe", recipe, "--format", "gguf", "--out", str(out),
                     "--calib-dataset", str(tiny_text), "--calib-samples", "4", "--calib-seqlen", "128", "--threads", "1"]) == 0
    _, t = read(out / "model.gguf")
    assert {t[f"blk.{i}.{n}.weight"].tensor_type.name for i in range(2) for n in ("attn_q", "ffn_down")} == {qtype}
