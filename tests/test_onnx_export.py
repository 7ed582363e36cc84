"""ONNX export of a tiny Llama and its ONNX Runtime session: logits against torch, the KV path,
leanfm's own codes in MatMulNBits, refusals.

Tolerance: 1e-3 absolute on logits. ONNX Runtime and torch run the same fp32 weights (packed
layers: the same codes, scales and zero points), so only the fp32 summation order differs; the
observed gap is ~1e-6.
"""
import numpy as np
import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import quantized_layers
from tests.conftest import tiny_llama

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from leanfm.models.onnx_export import _unpack_low_first, export_onnx  # noqa: E402
from leanfm.runtimes.onnxrt import OnnxRuntimeSession  # noqa: E402

TOL = 1e-3
W4S = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
W4A = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
W8 = {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}


def tiny(recipe=None, tie=True):
    """GQA (4 heads, 2 kv heads, head_dim 16); weights scaled up so logits are not all near 0."""
    m = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=300, tie=tie)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.mul_(5)
    if recipe:
        leanfm.apply_(m, recipe)
    return m


def torch_logits(m, ids):
    """Logits of one forward; with more than 16 tokens every packed backend runs dequant + fp32 GEMM."""
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def ids_of(n, seed=1):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("tie", [True, False])
def test_float_logits_match_torch(tmp_path, tie):
    m = tiny(tie=tie)
    path = export_onnx(m, tmp_path / "m.onnx")
    ids = ids_of(40)
    with OnnxRuntimeSession(path, threads=1, n_ctx=128) as s:
        got = s.window_logits(ids)
        assert s.build()["matmulnbits_nodes"] == 0 and s.info()["runtime"] == "onnxruntime"
    ref = torch_logits(m, ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < TOL and np.abs(ref).max() > 0.5
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind


def test_kv_path_matches_full_forward(tmp_path):
    """Prefill 7 tokens then 5 single steps: each step's logits equal one full forward's."""
    m = tiny()
    path = export_onnx(m, tmp_path / "m.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    outs = [o.name for o in sess.get_outputs()]
    ids = ids_of(7)
    feeds = {"input_ids": np.array([ids])} | {n: np.zeros((1, 2, 0, 16), np.float32) for n in past_names}
    res = dict(zip(outs, sess.run(None, feeds)))
    steps = [res["logits"][0, -1]]
    for _ in range(5):
        ids.append(int(np.argmax(steps[-1])))
        feeds = {"input_ids": np.array([[ids[-1]]])} | {n: res[n.replace("past_key_values.", "present.")] for n in past_names}
        res = dict(zip(outs, sess.run(None, feeds)))
        assert res["present.0.key"].shape == (1, 2, len(ids), 16)
        steps.append(res["logits"][0, -1])
    ref = torch_logits(m, ids)
    assert np.abs(np.stack(steps) - ref[6:]).max() < TOL
    # the session's greedy decode gives the same tokens as torch's greedy decode
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        toks = [s.prefill(ids[:7])]
        for _ in range(4):
            toks.append(s.step(toks[-1]))
    with torch.no_grad():
        want = m.generate(torch.tensor([ids[:7]]), max_new_tokens=5, do_sample=False)[0, 7:].tolist()
    assert toks == want


def _nbits_node(model_onnx, prefix):
    node = next(n for n in model_onnx.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(prefix))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model_onnx.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return node, inits, attrs


@pytest.mark.parametrize("recipe", [W4S, W4A, W8], ids=["w4-sym", "w4-asym", "w8"])
def test_packed_layers_run_their_own_codes(tmp_path, recipe):
    m = tiny(recipe)
    path = export_onnx(m, tmp_path / "q.onnx")
    ids = ids_of(40)
    with OnnxRuntimeSession(path, threads=1, n_ctx=128) as s:
        got = s.window_logits(ids)
        n_nbits = s.build()["matmulnbits_nodes"]
    assert n_nbits == 2 * 4  # per layer: qkv, o, gate_up, down (the tied head stays fp32)
    assert np.abs(got - torch_logits(m, ids)).max() < TOL

    g = onnx.load(str(path))
    packed = quantized_layers(m)
    bits = recipe["bits"]
    node, inits, attrs = _nbits_node(g, "model.layers.1.self_attn.qkv_proj")
    assert (attrs["bits"], attrs["block_size"], attrs["K"]) == (bits, 32, 64)
    codes = _unpack_low_first(inits[node.input[1]], bits).reshape(attrs["N"], 64)  # [N, blocks, blob] -> [N, K]
    scales = inits[node.input[2]].reshape(attrs["N"], 2)
    row = 0
    for name in ("q_proj", "k_proj", "v_proj"):  # q, k, v stacked along N in this order
        qw = packed[f"model.layers.1.self_attn.{name}"].quantized_weight()
        n = qw.codes.shape[0]
        assert np.array_equal(codes[row:row + n], qw.codes.numpy())
        assert np.array_equal(scales[row:row + n], qw.scale.numpy())
        if recipe["symmetric"]:
            assert len(node.input) == 3  # no zero points: MatMulNBits' default 2^(bits-1) is the symmetric grid
        else:
            zp = _unpack_low_first(inits[node.input[3]].reshape(attrs["N"], -1), bits)[:, :2]
            assert np.array_equal(zp[row:row + n], qw.zero.numpy().astype(np.uint8))
        row += n
    assert row == attrs["N"]


def test_packed_layers_can_be_written_dequantized(tmp_path):
    m = tiny(W4A)
    path = export_onnx(m, tmp_path / "d.onnx", int_bits_ok=False)
    assert not any(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node)
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL


def test_per_channel_groups_are_written_as_repeated_blocks(tmp_path):
    """Per-channel groups of 96 and 192 inputs (not powers of two) become blocks of 32 and 64 that
    repeat the row's scale: exact, no requantization."""
    m = tiny_llama(hidden=96, layers=1, heads=6, kv_heads=2, inter=192, vocab=300)
    leanfm.apply_(m, {"method": "rtn", "bits": 8, "group_size": None, "symmetric": False})
    path = export_onnx(m, tmp_path / "g.onnx")
    _, _, attrs = _nbits_node(onnx.load(str(path)), "model.layers.0.mlp.down_proj")
    assert (attrs["K"], attrs["block_size"]) == (192, 64)
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)).eval()
    with pytest.raises(LeanfmError) as e:
        export_onnx(m, tmp_path / "x.onnx")
    msg = str(e.value)
    assert "gpt2" in msg and "llama" in msg and "\n" not in msg
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("recipe,needle", [
    ({"method": "rtn", "bits": 4, "group_size": 8, "symmetric": True}, "groups of 8 inputs"),
    ({"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}, "3-bit codes"),
])
def test_grids_that_do_not_fit_are_refused(tmp_path, recipe, needle):
    m = tiny(recipe)
    with pytest.raises(LeanfmError) as e:
        export_onnx(m, tmp_path / "x.onnx")
    msg = str(e.value)
    assert needle in msg and "model.layers.0.self_attn.q_proj" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())


def test_session_errors_are_one_line(tmp_path):
    with pytest.raises(LeanfmError, match="no ONNX model"):
        OnnxRuntimeSession(tmp_path / "missing.onnx", 1, 64)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(LeanfmError, match="cannot load"):
        OnnxRuntimeSession(tmp_path / "bad.onnx", 1, 64)
    path = export_onnx(tiny(), tmp_path / "m.onnx")
    with pytest.raises(LeanfmError, match="exceeds the 512 positions"):
        OnnxRuntimeSession(path, 1, 4096)
    with OnnxRuntimeSession(path, 1, 8) as s:
        with pytest.raises(LeanfmError, match="prefill"):
            s.step(3)
        with pytest.raises(LeanfmError, match="n_ctx 8"):
            s.window_logits(ids_of(9))
        with pytest.raises(LeanfmError, match="ONNX Runtime failed"):
            s.prefill([1, 10_000])  # outside the 300-token vocabulary


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(LeanfmError, match=r"pip install 'leanfm\[onnx\]'"):
        OnnxRuntimeSession(tmp_path / "m.onnx", 1, 64)


def test_large_models_write_external_data(tmp_path, monkeypatch):
    """Past ONNX's 2 GB protobuf limit the weights go to ``<name>.data`` next to the graph
    (exercised here by lowering the limit)."""
    import leanfm.models.onnx_export as ox

    monkeypatch.setattr(ox, "PROTO_LIMIT", 0)
    m = tiny(W4S)
    path = export_onnx(m, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx.data").stat().st_size > path.stat().st_size
    ids = ids_of(20)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL


def test_mixed_layers_and_a_packed_head(tmp_path):
    """k_proj left in float beside packed q/v (separate nodes joined by Concat); an untied packed head."""
    m = tiny({**W4A, "skip": ["*.k_proj"]}, tie=False)
    packed = quantized_layers(m)
    assert "lm_head" in packed and "model.layers.0.self_attn.k_proj" not in packed
    path = export_onnx(m, tmp_path / "mix.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert "lm_head.MatMulNBits" in names and "model.layers.0.self_attn.q_proj.MatMulNBits" in names
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL


def test_fractional_zero_points_hqq(tmp_path):
    """HQQ's fractional zero points go in MatMulNBits' float zero-point input, unchanged."""
    m = tiny({"method": "hqq", "bits": 4, "group_size": 32, "iters": 2})
    qw = quantized_layers(m)["model.layers.0.mlp.up_proj"].quantized_weight()
    assert not torch.equal(qw.zero, qw.zero.round())
    path = export_onnx(m, tmp_path / "h.onnx")
    node, inits, attrs = _nbits_node(onnx.load(str(path)), "model.layers.0.mlp.gate_up_proj")
    zp = inits[node.input[3]].reshape(attrs["N"], -1)
    assert zp.dtype == np.float32 and np.array_equal(zp[128:], qw.zero.numpy())  # rows: gate then up
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL


def test_int8_activations_are_an_option(tmp_path):
    """accuracy_level 4: ONNX Runtime quantizes activations to int8 per block (faster, close but not
    equal to the fp32 values); anything outside 0..4 is refused."""
    m = tiny(W4S)
    path = export_onnx(m, tmp_path / "a4.onnx", accuracy_level=4)
    _, _, attrs = _nbits_node(onnx.load(str(path)), "model.layers.0.mlp.down_proj")
    assert attrs["accuracy_level"] == 4
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        got = s.window_logits(ids)
    ref = torch_logits(m, ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(LeanfmError, match="accuracy_level"):
        export_onnx(m, tmp_path / "x.onnx", accuracy_level=7)


def test_reloaded_checkpoint_with_fused_layers(tmp_path):
    """A checkpoint reloaded by leanfm has its q/k/v and gate/up fused (FusedSlice members): the
    export reads each member's own codes the same way."""
    from leanfm.kernels.checkpoint import load_quantized, save_quantized
    from leanfm.kernels.fuse import FusedSlice

    m = load_quantized(save_quantized(tiny(W4A), tmp_path / "ckpt"))
    packed = quantized_layers(m)
    if not any(isinstance(q, FusedSlice) for q in packed.values()):
        pytest.skip("no backend here fuses these layers")
    path = export_onnx(m, tmp_path / "r.onnx")
    ids = ids_of(24)
    with OnnxRuntimeSession(path, threads=1, n_ctx=64) as s:
        assert np.abs(s.window_logits(ids) - torch_logits(m, ids)).max() < TOL
