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
intra-op threads (OpenMP). The function is also the CPU implementation of the ``leanfm::int4_gemv``
operator, which compiled graphs call (:mod:`.cpp_build`).
"""
from __future__ import annotations

import torch

from .cpp_build import PRELUDE, build, define

_SRC = PRELUDE + r"""
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
// Four output rows at once (rows ``stride`` bytes apart), one activation row: the same sums as
// row_dot_avx2, but eight independent FMA chains instead of two, so the FMA latency (4-5
// cycles) no longer bounds a 64-column group, and each 8 floats of x are loaded once per 4 rows.
static inline void rows4_dot_avx2(const uint8_t* row, int64_t stride, const float* x, const float* xs, const float* s,
                                  const float* m, int64_t NG, int64_t G, int64_t H, float* out) {
  const __m256i lo_mask = _mm256_set1_epi32(15);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  float m0 = 0.f, m1 = 0.f, m2 = 0.f, m3 = 0.f;
  for (int64_t g = 0; g < NG; ++g) {
    const uint8_t* b = row + g * H;
    const float* xg = x + g * G;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (int64_t j = 0; j < H; j += 8) {
      const __m256 xl = _mm256_loadu_ps(xg + j), xh = _mm256_loadu_ps(xg + j + H);
#define LEANFM_ROW(r, A, C) { \
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + r * stride + j))); \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, lo_mask)), xl, A); \
        C = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, C); }
      LEANFM_ROW(0, a0, c0) LEANFM_ROW(1, a1, c1) LEANFM_ROW(2, a2, c2) LEANFM_ROW(3, a3, c3)
#undef LEANFM_ROW
    }
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(a0, c0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s[NG + g]), _mm256_add_ps(a1, c1), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_set1_ps(s[2 * NG + g]), _mm256_add_ps(a2, c2), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_set1_ps(s[3 * NG + g]), _mm256_add_ps(a3, c3), acc3);
    m0 += m[g] * xs[g]; m1 += m[NG + g] * xs[g]; m2 += m[2 * NG + g] * xs[g]; m3 += m[3 * NG + g] * xs[g];
  }
  out[0] = hsum8(acc0) + m0; out[1] = hsum8(acc1) + m1; out[2] = hsum8(acc2) + m2; out[3] = hsum8(acc3) + m3;
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
    int64_t n = n0;
    if (H % 8 == 0) {
      float out[4];
      for (; n + 4 <= n1; n += 4) {
        for (int64_t r = 0; r < M; ++r) {
          rows4_dot_avx2(cp + n * (K / 2), K / 2, xp + r * K, xs + r * NG, sp + n * NG, mp + n * NG, NG, G, H, out);
          for (int j = 0; j < 4; ++j) yp[r * N + n + j] = out[j];
        }
      }
    }
    for (; n < n1; ++n) {
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

TORCH_LIBRARY_IMPL(leanfm, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
"""


def _shape(x, qweight, scale, minus_sz, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


define("int4_gemv(Tensor x, Tensor qweight, Tensor scale, Tensor minus_sz, int group_size) -> Tensor", _shape)


def load():
    """The compiled function (eager code calls it directly), or a string saying why it is unavailable."""
    mod = build("int4_gemv", _SRC, ("int4_gemv",))
    return mod if isinstance(mod, str) else mod.int4_gemv


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
