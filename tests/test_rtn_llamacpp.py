"""``rtn`` with ``rounding: llama.cpp`` (the ``rtn-q4_0`` recipe): leanfm int4/int8 weights equal to
what llama.cpp's own quantizer writes, checked byte for byte against ``gguf``'s quantizer (a
Python port of ggml's reference quantizers) through the GGUF export."""
import numpy as np
import pytest

import leanfm
from leanfm.errors import LeanfmError
from leanfm.models.gguf_export import _permute, export_gguf
from leanfm.recipe import load_recipe
from tests.conftest import tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")

TYPES = {"q4_0": (4, True), "q4_1": (4, False), "q8_0": (8, True)}


@pytest.mark.parametrize("qtype", list(TYPES))
def test_llama_cpp_rounding_equals_ggufs_quantizer_bit_for_bit(tmp_path, qtype):
    bits, sym = TYPES[qtype]
    tok = tiny_tokenizer()
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=len(tok))
    dense = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if n.startswith("model.layers.") and hasattr(mod, "in_features")}
    leanfm.apply_(m, {"method": "rtn", "bits": bits, "group_size": 32, "symmetric": sym, "rounding": "llama.cpp"})
    path = export_gguf(m, tok, tmp_path / "m.gguf", qtype, float_type="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    checked = 0
    for hf, w in dense.items():
        i, key = hf.split(".")[2], hf.split(".", 3)[3]
        name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[key]
        heads = 4 if name == "attn_q" else 2 if name == "attn_k" else None
        w = _permute(w, heads) if heads else w
        want = gguf.quants.quantize(w.numpy().astype(np.float32), gtype)
        got = np.asarray(tensors[f"blk.{i}.{name}.weight"].data)
        assert got.tobytes() == want.tobytes(), f"{hf} differs from llama.cpp's {qtype}"
        checked += 1
    assert checked == 14


def test_the_recipe_is_llama_cpps_q4_0():
    r = load_recipe("rtn-q4_0")
    (step,) = r.steps
    assert (step.bits, step.group_size, step.symmetric, step.rounding, step.gguf_type()) == (4, 32, True, "llama.cpp", "q4_0")


@pytest.mark.parametrize("step", [
    {"method": "rtn", "bits": 4, "group_size": 64, "rounding": "llama.cpp"},
    {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": False, "rounding": "llama.cpp"},
    {"method": "rtn", "bits": 4, "group_size": 32, "rounding": "llama-cpp"},
])
def test_rounding_without_a_llama_cpp_block_type_is_refused(step):
    tok = tiny_tokenizer()
    m = tiny_llama(hidden=64, layers=1, heads=4, kv_heads=2, inter=128, vocab=len(tok))
    with pytest.raises(LeanfmError, match="rounding"):
        leanfm.apply_(m, step)
