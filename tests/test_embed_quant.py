"""embed_quant: the token embedding as integer codes, shared with a tied LM head; lookups,
bytes, checkpoints, the predictor's pricing, and its refusals."""
from __future__ import annotations

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.formats.quantized import dequantize
from leanfm.kernels.qembedding import QuantEmbedding
from leanfm.measure.memory import weight_bytes
from leanfm.methods.quantize.grid import rtn_quantize

from .conftest import tiny_llama


@pytest.mark.parametrize("bits,group,sym,backend", [(8, None, True, "int8pack"), (4, 32, False, "cpp-int4"),
                                                    (4, 64, True, "reference"), (8, 32, False, "reference")])
def test_lookup_gathers_exactly_the_dequantized_rows(bits, group, sym, backend):
    from leanfm.kernels import backends as B
    from leanfm.formats.layout import Layout

    model = tiny_llama(hidden=64, vocab=300)
    w = model.model.embed_tokens.weight.detach().clone()
    be = B.get(backend)
    if be.unsupported(Layout(bits, group or 64, 64, 300), sym):
        pytest.skip(f"{backend} does not run here")
    leanfm.apply_(model, {"method": "embed_quant", "bits": bits, "group_size": group, "symmetric": sym, "backend": backend})
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.table.backend.name == backend
    qw = rtn_quantize(w, bits, group, sym)
    want = dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)
    ids = torch.tensor([[5, 0, 299, 5], [17, 3, 3, 250]])
    assert torch.equal(emb(ids), want[ids])  # the same grid as rtn, gathered row by row, no rounding of its own
    assert model.lm_head is emb.table  # tied head = the same packed table


def test_tied_head_shares_one_copy_and_bytes_drop_as_counted():
    from leanfm.formats.layout import stored_weight_bytes

    model = tiny_llama(hidden=64, vocab=300)
    before = weight_bytes(model)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    leanfm.apply_(model, {"method": "embed_quant", "bits": 8, "backend": "reference"})
    after = weight_bytes(model)
    assert before - after == 300 * 64 * 4 - stored_weight_bytes(8, None, 64, 300)  # the fp32 table, once, for its codes
    out = model(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8-bit per-row: close to fp32


def test_untied_head_is_left_alone():
    model = tiny_llama(hidden=64, vocab=300, tie=False)
    head = model.lm_head
    leanfm.apply_(model, {"method": "embed_quant", "bits": 4, "group_size": 64, "symmetric": False})
    assert model.lm_head is head and isinstance(model.model.embed_tokens, QuantEmbedding)


def test_checkpoint_round_trip(tmp_path):
    from leanfm.kernels.checkpoint import load_quantized, read_quant_manifest, save_quantized

    model = tiny_llama(hidden=64, vocab=300)
    leanfm.apply_(model, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    leanfm.apply_(model, {"method": "embed_quant", "bits": 4, "group_size": 32, "symmetric": False})
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits
    save_quantized(model, tmp_path)
    man = read_quant_manifest(tmp_path)["layers"]["model.embed_tokens"]
    assert man["kind"] == "embedding" and man["tied_head"] == "lm_head"
    back = load_quantized(tmp_path)
    assert isinstance(back.model.embed_tokens, QuantEmbedding) and back.lm_head is back.model.embed_tokens.table
    assert torch.allclose(back(ids).logits, want, atol=1e-5)
    assert weight_bytes(back) == weight_bytes(model)


def test_gemma_scale_is_kept():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=32, intermediate_size=128, vocab_size=100, pad_token_id=0)).eval()
    ids = torch.tensor([[1, 7, 42]])
    ref = model.model.embed_tokens(ids)
    leanfm.apply_(model, {"method": "embed_quant", "bits": 8})
    got = model.model.embed_tokens(ids)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()  # scaled by sqrt(hidden) as Gemma's own lookup


def test_refusals():
    model = tiny_llama(hidden=64, vocab=300)
    leanfm.apply_(model, {"method": "embed_quant", "bits": 8})
    with pytest.raises(LeanfmError, match="already quantized"):
        leanfm.apply_(model, {"method": "embed_quant", "bits": 8})
    with pytest.raises(LeanfmError, match="cannot gather embedding rows"):
        leanfm.apply_(tiny_llama(), {"method": "embed_quant", "bits": 4, "group_size": 32, "backend": "tinygemm-int4"})
    with pytest.raises(LeanfmError, match="does not divide in_features 64"):
        leanfm.apply_(tiny_llama(), {"method": "embed_quant", "bits": 4, "group_size": 48})


def test_predictor_prices_embedding_and_rejects_unpackable_widths():
    from leanfm.predict.analyzer import predict

    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 300, "tie_word_embeddings": True}
    # a factor of rank 31 (an odd width) cannot hold int4 codes two per byte, nor groups of 32, nor 2:4
    with pytest.raises(LeanfmError, match="odd in_features"):
        predict(cfg, [{"method": "svd", "rank": 31}, {"method": "rtn", "bits": 4}], "local")
    with pytest.raises(LeanfmError, match="does not divide in_features 31"):
        predict(cfg, [{"method": "svd", "rank": 31}, {"method": "rtn", "bits": 8, "group_size": 32}], "local")
    with pytest.raises(LeanfmError, match="needs in_features divisible by 4"):
        predict(cfg, [{"method": "svd", "rank": 31}, {"method": "wanda", "pattern": "2:4"}], "local")
    # mixed_precision offers each layer only the formats that fit it: a nominal group that does not divide is no error
    predict(cfg, [{"method": "svd", "rank": 30}, {"method": "mixed_precision", "avg_bits": 5.0, "formats": ["w4", "w4g32", "w8"]}],
            "local")


def test_compress_saves_and_reloads_and_foreign_formats_refuse(tmp_path):
    from leanfm.models.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_llama(hidden=64, vocab=300)
    leanfm.apply_(model, {"method": "embed_quant", "bits": 8})  # the embedding alone: no packed linear
    ids = torch.tensor([[4, 8, 15, 16]])
    save_checkpoint(model, tmp_path / "ck")
    assert torch.allclose(load_checkpoint(tmp_path / "ck")(ids).logits, model(ids).logits, atol=1e-5)
    for fmt in ("gguf", "compressed-tensors"):
        with pytest.raises(LeanfmError, match="packed embedding table"):
            save_checkpoint(model, tmp_path / fmt, fmt=fmt)
