"""RTN quantization grid: exact against a slow per-group reference, and its invariants."""
import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.methods.quantize.grid import dequantize, fake_quantize, resolve_group_size, rtn_quantize


def slow_reference(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """Element-by-group loop in the GPTQ reference quantizer's formulas (float32)."""
    out, inf = w.shape
    gs = inf if group_size is None else group_size
    maxq = 2**bits - 1
    codes = torch.empty(out, inf, dtype=torch.uint8)
    deq = torch.empty(out, inf)
    for r in range(out):
        for g0 in range(0, inf, gs):
            x = w[r, g0:g0 + gs]
            xmin = torch.clamp(x.min(), max=0)
            xmax = torch.clamp(x.max(), min=0)
            if symmetric:
                xmax = torch.maximum(xmin.abs(), xmax)
                xmin = -xmax
            if xmin == 0 and xmax == 0:
                xmin, xmax = torch.tensor(-1.0), torch.tensor(1.0)
            scale = (xmax - xmin) / maxq
            zero = torch.tensor(float((maxq + 1) // 2)) if symmetric else torch.round(-xmin / scale)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            codes[r, g0:g0 + gs] = q.to(torch.uint8)
            deq[r, g0:g0 + gs] = (q - zero) * scale
    return codes, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_equals_slow_reference(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(12, 48) * 0.05
    w[3, :16] = 0.0  # an all-zero group
    qw = rtn_quantize(w, bits, group_size, symmetric)
    ref_codes, ref_deq = slow_reference(w, bits, group_size, symmetric)
    assert torch.equal(qw.codes, ref_codes)
    assert torch.equal(dequantize(qw.codes, qw.scale, qw.zero, qw.group_size), ref_deq)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_bounded_by_half_step_and_idempotent(bits):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    qw = rtn_quantize(w, bits, 32, symmetric=False)
    deq = dequantize(qw.codes, qw.scale, qw.zero, 32)
    step = qw.scale.repeat_interleave(32, dim=1)
    assert ((w - deq).abs() <= step / 2 + 1e-6).all()
    assert int(qw.codes.max()) <= 2**bits - 1
    again = fake_quantize(deq, bits, 32, symmetric=False)
    assert torch.allclose(again, deq, atol=1e-6)


def test_more_bits_less_error():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    errs = [(fake_quantize(w, b) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_unsupported_bits(bits):
    with pytest.raises(LeanfmError, match="bits"):
        rtn_quantize(torch.randn(4, 8), bits)


def test_group_size_not_dividing_names_layer_and_suggests_divisors():
    with pytest.raises(LeanfmError) as e:
        resolve_group_size(576, 128, "model.layers.0.self_attn.q_proj")
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg
    assert "64" in msg and "192" in msg
    assert resolve_group_size(576, 64) == 64 and resolve_group_size(576, None) == 576
