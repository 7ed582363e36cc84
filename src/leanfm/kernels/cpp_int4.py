"""A C++ int4 GEMV for decode on x86 CPUs, compiled on first use (torch cpp_extension).

Why our own: ``aten._weight_int4pack_mm_for_cpu`` (tinygemm) is compute-bound at one row on
this CPU (about 10 GMAC/s, 167 us for a 3072x576 layer whose 0.9 MB of codes stream in a tenth
of that), and it needs bf16 activations, costing two casts per call. This kernel reads fp32
activations and streams the packed codes once.

Layout (``pack``): per output row, per group of ``G`` input columns, byte ``j`` (``j < G/2``)
holds column ``j`` in its low nibble and column ``j + G/2`` in its high nibble, so the inner loop
reads two contiguous halves of ``x``: 8 bytes are widened to 8 int32 lanes, masked/shifted into
16 codes, converted to float and FMA'd with two 8-float loads of ``x`` (AVX2), two accumulator
chains per group, one horizontal sum per row. The zero point is
folded: ``w = s * (q - z) = s*q + m`` with ``m = -s*z``, hence per row and group

    y[n] += s[n,g] * sum_j q[n,g,j] * x[g,j]  +  m[n,g] * sum_j x[g,j]

where the group sums of ``x`` are computed once per call. Rows are split across torch's
intra-op threads (OpenMP).
"""
from __future__ import annotations

import functools
import hashlib

import torch

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <immintrin.h>

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One output row, one activation row, H % 8 == 0: 8 bytes (16 codes) per step, two FMA chains.
static inline float row_dot_avx2(const uint8_t* row, const float* x, const float* xs, const float* s, const float* m,
                                 int64_t NG, int64_t G, int64_t H) {
  const __m256i lo_mask = _mm256_set1_epi32(15);
  __m256 acc = _mm256_setzero_ps();
  float accm = 0.f;
  for (int64_t g = 0; g < NG; ++g) {
    const uint8_t* b = row + g * H;
    const float* xg = x + g * G;
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < H; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + j)));
      d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, lo_mask)), _mm256_loadu_ps(xg + j), d0);
      d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xg + j + H), d1);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(d0, d1), acc);
    accm += m[g] * xs[g];
  }
  return hsum8(acc) + accm;
}

// y[M, N] = x[M, K] @ W^T with W[n, k] = scale[n, g] * code[n, k] + minus_sz[n, g], g = k / G.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minus_sz, int64_t G) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be fp32 [M, K]");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2, "codes must be uint8 [N, K/2]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), NG = K / G, H = G / 2;
  TORCH_CHECK(K % G == 0 && G % 2 == 0 && codes.size(1) * 2 == K, "layout mismatch");
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == NG && minus_sz.sizes() == scale.sizes(), "scale shape");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(M * NG, 0.f);  // group sums of x, for the folded zero point
  for (int64_t i = 0; i < M * NG; ++i)
    for (int64_t j = 0; j < G; ++j) xsum[i] += xp[i * G + j];
  const float* xs = xsum.data();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = minus_sz.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(G);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = cp + n * (K / 2);
      const float* s = sp + n * NG;
      const float* m = mp + n * NG;
      if (H % 8 == 0) {
        for (int64_t r = 0; r < M; ++r) yp[r * N + n] = row_dot_avx2(row, xp + r * K, xs + r * NG, s, m, NG, G, H);
      } else if (M == 1) {
        float acc = 0.f;
        for (int64_t g = 0; g < NG; ++g) {
          const uint8_t* b = row + g * H;
          const float* xg = xp + g * G;
          float d = 0.f;
          for (int64_t j = 0; j < H; ++j)
            d += float(b[j] & 15) * xg[j] + float(b[j] >> 4) * xg[j + H];
          acc += s[g] * d + m[g] * xs[g];
        }
        yp[n] = acc;
      } else {
        for (int64_t r = 0; r < M; ++r) yp[r * N + n] = 0.f;
        for (int64_t g = 0; g < NG; ++g) {
          const uint8_t* b = row + g * H;
          for (int64_t j = 0; j < H; ++j) { w[j] = float(b[j] & 15); w[j + H] = float(b[j] >> 4); }
          for (int64_t r = 0; r < M; ++r) {
            const float* xg = xp + r * K + g * G;
            float d = 0.f;
            for (int64_t j = 0; j < G; ++j) d += w[j] * xg[j];
            yp[r * N + n] += s[g] * d + m[g] * xs[r * NG + g];
          }
        }
      }
    }
  });
  return y;
}
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def load():
    """The compiled op, or a string saying why it is unavailable (no compiler, not x86 AVX2...)."""
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "needs an x86 CPU with AVX2 and FMA"
    cflags = ["-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]
    name = "leanfm_int4_gemv_" + hashlib.sha1((_SRC + " ".join(cflags) + torch.__version__).encode()).hexdigest()[:10]
    try:
        from torch.utils.cpp_extension import load_inline

        mod = load_inline(name=name, cpp_sources=[_SRC], functions=["int4_gemv"], extra_cflags=cflags,
                          extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / headers / ninja: the backend reports itself unavailable
        return f"could not compile the C++ kernel ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return mod.int4_gemv


@torch.library.custom_op("leanfm::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minus_sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel as a torch operator, so ``torch.compile`` keeps it as one opaque call in its
    graph (a pybind function would break the graph). Eager code calls :func:`load`'s function
    directly and skips the operator's dispatch."""
    fn = load()
    if isinstance(fn, str):
        raise RuntimeError(f"cpp-int4: {fn}")
    return fn(x, qweight, scale, minus_sz, group_size)


@int4_gemv.register_fake
def _int4_gemv_shape(x, qweight, scale, minus_sz, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def pack(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """``uint8 [N, K]`` codes (0..15) -> ``uint8 [N, K/2]`` in the kernel's half-group layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact inverse of :func:`pack`."""
    n, half = packed.shape
    p = packed.reshape(n, (2 * half) // group_size, 1, group_size // 2)
    return torch.cat([p & 0x0F, p >> 4], dim=2).reshape(n, 2 * half)
