"""leanfm grids as llama.cpp blocks: byte layout and values checked against the gguf package's
own quantizer/dequantizer (a port of ggml-quants.c)."""
import numpy as np
import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.formats.gguf_blocks import fit_problem, llama_grid, to_blocks
from leanfm.formats.quantized import QuantizedWeight, dequantize

gguf = pytest.importorskip("gguf")
QT = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def weight(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero block: d = 0 must not divide by zero
    w[5, 40] = 0.9  # an outlier
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_llama_grid_is_llama_cpps_quantization_bit_for_bit(qtype, seed):
    w = weight(seed=seed)
    ours = to_blocks(llama_grid(w, qtype), qtype)
    theirs = gguf.quants.quantize(w.numpy(), QT[qtype])
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype,bits,sym", [("q4_0", 4, True), ("q4_1", 4, False), ("q8_0", 8, True), ("q4_0", 3, True),
                                            ("q8_0", 4, True), ("q4_1", 3, False)])
def test_leanfm_codes_keep_their_values_in_blocks(qtype, bits, sym):
    """Codes chosen by leanfm (random here, as GPTQ's would be) are stored as they are: llama.cpp's
    dequantization of the blocks equals leanfm's, scales rounded to fp16 as the block stores them.
    A symmetric grid of fewer bits (3-bit in Q4_0, 4-bit in Q8_0) is shifted into the type's, exactly."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 16, 128
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g).to(torch.uint8)
    scale = (torch.rand(rows, cols // 32, generator=g) * 0.01 + 1e-3).half().float()
    zero = torch.full_like(scale, 2.0 ** (bits - 1)) if sym else torch.randint(0, 16, scale.shape, generator=g).float()
    zero = zero.clamp(max=2 ** bits - 1)
    qw = QuantizedWeight(codes, scale, zero, bits, 32)
    back = gguf.quants.dequantize(to_blocks(qw, qtype), QT[qtype]).reshape(rows, cols)
    ref = dequantize(codes, scale, zero, 32)
    tol = 0 if sym else 1e-3 * float(scale.max()) * 16  # q4_1 stores m = -s*z in fp16
    assert np.abs(back - ref.numpy()).max() <= tol


@pytest.mark.parametrize("change,needle", [
    (dict(group_size=64), "groups are 64 columns"),
    (dict(bits=8), "8-bit codes"),
    (dict(zero="asym"), "asymmetric"),
])
def test_grids_that_do_not_fit_are_refused_naming_the_layer(change, needle):
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    gs = change.get("group_size", 32)
    scale = torch.ones(4, 64 // gs)
    zero = torch.full_like(scale, 8.0) if change.get("zero") != "asym" else torch.arange(4.0).repeat_interleave(64 // gs).view(4, -1)
    qw = QuantizedWeight(codes, scale, zero, change.get("bits", 4), gs)
    with pytest.raises(LeanfmError) as e:
        to_blocks(qw, "q4_0", name="model.layers.0.mlp.down_proj")
    assert "model.layers.0.mlp.down_proj cannot be written as q4_0" in str(e.value) and needle in str(e.value)
