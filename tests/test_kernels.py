"""Packed formats and execution backends: exact round trips, kernels against the reference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from leanfm.errors import LeanfmError
from leanfm.kernels import backends, packing
from leanfm.kernels.qlinear import QuantLinear
from leanfm.measure.memory import weight_bytes
from leanfm.methods.quantize.grid import dequantize, rtn_quantize


def test_int4_nibble_pack_roundtrip_exact():
    q = torch.randint(0, 16, (7, 20), dtype=torch.uint8)
    p = packing.pack_int4(q)
    assert p.shape == (7, 10) and p.dtype == torch.uint8
    assert torch.equal(packing.unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


@pytest.mark.parametrize("shape", [(32, 64), (192, 576), (96, 128), (48, 10)])
def test_int4_aten_layout_roundtrips_exactly(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = packing.pack_int4_aten(q)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    assert torch.equal(packing.unpack_int4_aten(packed), q)


# Each ISA torch can dispatch to on this CPU packs int4 differently (DEFAULT and AVX2 differ here;
# AVX-512 differs again). The child checks exact unpacking and the kernel against the fp32 reference.
_ISA_CHILD = r"""
import torch, torch.nn.functional as F
from leanfm.kernels import packing
from leanfm.kernels.qlinear import QuantLinear
from leanfm.methods.quantize.grid import dequantize, rtn_quantize
torch.manual_seed(0)
q = torch.randint(0, 16, (96, 128), dtype=torch.uint8)
assert torch.equal(packing.unpack_int4_aten(packing.pack_int4_aten(q)), q)
w = torch.randn(96, 576)
qw = rtn_quantize(w, 4, 64, False)
ql = QuantLinear(qw, None, "tinygemm-int4")
assert torch.equal(ql.quantized_weight().codes, qw.codes)
x = torch.randn(1, 3, 576)
ref = F.linear(x, dequantize(qw.codes, qw.scale, qw.zero, qw.group_size))
rel = ((ql(x) - ref).norm() / ref.norm()).item()
assert rel < 1e-2, rel
print(torch.backends.cpu.get_cpu_capability(), rel)
"""


def _isas() -> list[str]:
    import re

    flags = set(re.findall(r"\w+", open("/proc/cpuinfo").read())) if os.path.exists("/proc/cpuinfo") else set()
    return ["default"] + (["avx2"] if "avx2" in flags else []) + (["avx512"] if "avx512f" in flags else [])


@pytest.mark.parametrize("isa", _isas())
def test_tinygemm_exact_and_correct_under_each_isa(isa):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    out = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == isa.upper()  # torch really dispatched to that ISA


def test_fixed_tiling_would_be_wrong_somewhere():
    """Why the layout is probed: aten's packing differs between the ISAs reachable here."""
    child = "import torch; torch.manual_seed(0); q = torch.randint(0, 16, (64, 64), dtype=torch.int32); " \
            "print(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).flatten()[:64].tolist())"
    outs = {isa: subprocess.run([sys.executable, "-c", child], env={**os.environ, "ATEN_CPU_CAPABILITY": isa},
                                capture_output=True, text=True, timeout=120).stdout for isa in _isas()}
    if len(outs) < 2:
        pytest.skip("only one ISA reachable")
    assert len(set(outs.values())) > 1, outs


def test_int8_roundtrip_exact():
    q = torch.randint(0, 256, (5, 9), dtype=torch.uint8)
    assert torch.equal(packing.unpack_int8(packing.pack_int8(q)), q)
    assert packing.pack_int8(torch.tensor([[128]], dtype=torch.uint8)).item() == 0


def test_bad_pack_input():
    with pytest.raises(LeanfmError, match="even number of columns"):
        packing.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(LeanfmError, match="even number of columns"):
        packing.pack_int4_aten(torch.zeros(32, 3, dtype=torch.uint8))


CASES = [  # backend, bits, group, symmetric
    ("reference", 4, 64, False), ("reference", 3, None, True), ("reference", 8, None, True), ("reference", 6, 32, False),
    ("tinygemm-int4", 4, 64, False), ("tinygemm-int4", 4, None, True), ("tinygemm-int4", 3, 192, True), ("tinygemm-int4", 2, 32, False),
    ("int8pack", 8, None, True),
    ("cpp-int4", 4, 64, False), ("cpp-int4", 4, None, True), ("cpp-int4", 3, 192, True), ("cpp-int4", 2, 32, False),
    ("cpp-int4", 4, 24, False),  # half-group of 12 codes: the scalar loop instead of the AVX2 one
]


def _need(backend):
    if backend == "cpp-int4":
        from leanfm.kernels import cpp_int4

        op = cpp_int4.load()
        if isinstance(op, str):
            pytest.skip(f"cpp-int4 unavailable on this machine: {op}")


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("backend,bits,group,sym", CASES)
def test_backend_unpacks_exactly_and_matches_reference(backend, bits, group, sym, chunked, monkeypatch):
    _need(backend)
    if chunked:  # the dense path in pieces of 40 output rows (40, 40, 16) where the layout allows
        monkeypatch.setattr(backends, "DENSE_CHUNK", 40 * 576)
    torch.manual_seed(0)
    w = torch.randn(96, 576)
    qw = rtn_quantize(w, bits, group, sym)
    ql = QuantLinear(qw, None, backend)
    assert ql.backend.name == backend
    back = ql.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    ref_w = dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)
    assert torch.equal(ql.dequantized_weight(), ref_w)
    for rows in (1, 5, backends.DECODE_MAX_TOKENS + 1, 40):
        x = torch.randn(1, rows, 576)
        ref = F.linear(x, ref_w)
        got = ql(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        rel = ((got - ref).norm() / ref.norm()).item()
        if backend == "reference" or rows > backends.DECODE_MAX_TOKENS:
            assert rel < 1e-6, rel  # fp32 dequant path: same numbers as the reference
        elif backend == "cpp-int4":
            assert rel < 1e-5, rel  # fp32 activations, folded zero point: only summation order differs
        else:
            # bf16 activations and bf16 scale/zero: 2^-8 relative rounding each. The kernel's zero
            # term (8 - z) * s is up to 8 steps for a grid whose codes span 2^bits steps, so its
            # rounding weighs more on a 2-bit grid than on a 4-bit one.
            assert rel < (1.5e-2 if bits >= 3 else 3e-2), rel


def test_bias_is_kept():
    lin = torch.nn.Linear(64, 32)
    qw = rtn_quantize(lin.weight.detach(), 4, 32, True)
    ql = QuantLinear(qw, lin.bias, "reference")
    x = torch.randn(3, 64)
    ref = F.linear(x, dequantize(qw.codes, qw.scale, qw.zero, 32), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-6)


@pytest.mark.parametrize("backend,bits,group,sym,why", [
    ("tinygemm-int4", 8, None, True, "at most 4 bits"),
    ("tinygemm-int4", 4, 48, True, "multiple of 32"),
    ("int8pack", 4, None, True, "8-bit symmetric per-channel"),
    ("int8pack", 8, 32, True, "8-bit symmetric per-channel"),
    ("cpp-int4", 8, None, True, "at most 4 bits"),
    ("cpp-int4", 4, 3, True, "even group size"),
])
def test_backend_refuses_layouts_it_cannot_run(backend, bits, group, sym, why):
    _need(backend)
    qw = rtn_quantize(torch.randn(64, 96), bits, group, sym)
    with pytest.raises(LeanfmError, match=why):
        QuantLinear(qw, None, backend)


def test_unknown_backend():
    with pytest.raises(LeanfmError, match="unknown kernel backend 'cuda-magic'"):
        backends.get("cuda-magic")


@pytest.mark.parametrize("bits,group,limit", [(4, 64, 0.3), (4, None, 0.3), (8, None, 0.3)])
def test_packed_weight_bytes_really_shrink(bits, group, limit):
    lin = torch.nn.Linear(576, 1536, bias=False)
    fp32 = weight_bytes(lin)
    ql = QuantLinear(rtn_quantize(lin.weight.detach(), bits, group, bits == 8), None, "auto")
    ratio = weight_bytes(ql) / fp32
    expect = (0.5 if bits == 4 else 1.0) / 4
    assert expect <= ratio <= limit, ratio  # codes alone, plus scales/zeros that must be counted


def test_memory_metrics_count_packed_linears():
    import leanfm
    from leanfm.measure.memory import model_size_on_disk_bytes, quantized_linear_bytes
    from tests.conftest import tiny_llama

    dense = tiny_llama(hidden=128, inter=256)
    size0 = model_size_on_disk_bytes(dense)
    m = leanfm.apply_(tiny_llama(hidden=128, inter=256), {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False})
    packed, fp32 = quantized_linear_bytes(m)
    assert fp32 == 4 * sum(p.numel() for n, p in dense.named_parameters() if n.endswith("proj.weight"))
    assert 0.125 < packed / fp32 <= 0.3
    assert model_size_on_disk_bytes(m) < size0


@pytest.mark.parametrize("in_features", [20, 148, 145])
def test_int8pack_is_not_used_where_aten_computes_garbage(in_features):
    """aten._weight_int8pack_mm returns inf/garbage (or crashes) when in_features is not a multiple
    of 8 on torch 2.13 here; leanfm refuses it and ``auto`` falls back to a correct path."""
    qw = rtn_quantize(torch.randn(64, in_features), 8, None, True)
    with pytest.raises(LeanfmError, match="divisible by 32"):
        QuantLinear(qw, None, "int8pack")
    ql = QuantLinear(qw, None, "auto")
    assert ql.backend.name != "int8pack"
    x = torch.randn(3, in_features)
    assert torch.allclose(ql(x), F.linear(x, dequantize(qw.codes, qw.scale, qw.zero, in_features)), atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp-int4", "int8pack"])
def test_chunked_dense_path_reuses_one_workspace_and_keeps_gradients(backend, monkeypatch):
    _need(backend)
    monkeypatch.setattr(backends, "DENSE_CHUNK", 40 * 576)  # 96 rows in pieces of 40, 40, 16
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(96, 576), 8 if backend == "int8pack" else 4, None if backend == "int8pack" else 64,
                      backend == "int8pack")
    ql = QuantLinear(qw, None, backend)
    ref_w = dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)
    x = torch.randn(2, backends.DECODE_MAX_TOKENS + 4, 576)
    with torch.no_grad():
        first = ql(x)
        buf = backends._ws.buf
        assert buf.numel() == 40 * 576 and torch.equal(ql(x), first)  # reused, same result
        assert backends._ws.buf is buf
    torch.testing.assert_close(first, F.linear(x, ref_w), rtol=1e-6, atol=1e-5)
    xg = x.clone().requires_grad_(True)  # autograd keeps every chunk's weight: no workspace reuse
    ql(xg).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    F.linear(xr, ref_w).square().sum().backward()
    assert ((xg.grad - xr.grad).norm() / xr.grad.norm()).item() < 1e-5  # fp32 summation order only


@pytest.mark.parametrize("n_rows", [3, 98])
def test_cpp_int4_row_tails_and_the_operator_match_the_reference(n_rows):
    """Rows go through the kernel four at a time with a one-row tail (98 = 2 x (12 x 4 + 1) over
    two threads; 3: tail only); the ``leanfm::int4_gemv`` operator a compiled graph calls gives
    the pybind function's numbers exactly."""
    _need("cpp-int4")
    from leanfm.kernels import cpp_int4

    torch.manual_seed(1)
    qw = rtn_quantize(torch.randn(n_rows, 192), 4, 64, False)
    ref_w = dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)
    packed, minus_sz = cpp_int4.pack(qw.codes, 64), (-qw.scale * qw.zero).float().contiguous()
    scale = qw.scale.float().contiguous()
    for m in (1, 3):
        x = torch.randn(m, 192)
        got = cpp_int4.load()(x, packed, scale, minus_sz, 64)
        torch.testing.assert_close(got, x @ ref_w.T, rtol=1e-5, atol=1e-4)
        assert torch.equal(torch.ops.leanfm.int4_gemv(x, packed, scale, minus_sz, 64), got)


@pytest.mark.parametrize("n,k", [(7, 13), (98, 576), (4, 8)])
def test_cpp_f32_gemv_matches_linear(n, k):
    """Row tails (N % 4), column tails (K % 8), several rows of x, with and without a bias; the
    operator and the pybind function agree exactly."""
    from leanfm.kernels import cpp_gemv

    fn = cpp_gemv.load()
    if isinstance(fn, str):
        pytest.skip(f"cpp-gemv unavailable on this machine: {fn}")
    torch.manual_seed(2)
    w, b = torch.randn(n, k), torch.randn(n)
    tol = dict(rtol=1e-5, atol=1e-4)  # only the summation order differs: sums of ~k products of size ~1
    for m in (1, 3):
        x = torch.randn(m, k)
        torch.testing.assert_close(fn(x, w, None), F.linear(x, w), **tol)
        got = torch.ops.leanfm.f32_gemv(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), **tol)
        assert torch.equal(got, fn(x, w, b))
    with pytest.raises(RuntimeError, match="contiguous"):
        fn(torch.randn(1, k), torch.randn(k, n).T, None)
