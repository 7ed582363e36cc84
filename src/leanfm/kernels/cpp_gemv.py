"""A C++ fp32 GEMV for decode on x86 CPUs: ``y = x @ W^T (+ b)`` for a few rows of ``x``.

Why our own: at one row, aten's ``mm`` (oneDNN/MKL's GEMM) reads SmolLM2's weight matrices at
9.7-15.6 GB/s on the 2-core AVX2 machine, against 22 GB/s for this kernel on the same matrices
(docs/benchmarks.md, "Compiled decode"). Decode at batch 1 is a string of GEMVs, each reading
its whole weight once, so the read rate is the decode speed.

The loop: rows of ``W`` are split into blocks of 4 and the blocks across torch's intra-op threads
(OpenMP), so each thread streams one contiguous slab of memory. For each block, 4 accumulators
(one per row) take an 8-float FMA per column step against the same 8 floats of ``x``, so ``x``
is loaded once per 4 rows and the 4 rows stream side by side; one horizontal sum per row at
the end, a scalar tail for ``K % 8``. With several rows of ``x`` the block is re-read from L1
for each row, so the weights still cross the memory bus once.

A compiled decode graph reaches it through ``leanfm::f32_gemv`` (:mod:`.gemv_pass` rewrites the
graph's one-row fp32 ``mm``/``addmm`` into it); :func:`load` gives the function for eager use.
"""
from __future__ import annotations

import torch

from .cpp_build import PRELUDE, build, define

_SRC = PRELUDE + r"""
static inline float dot1(const float* w, const float* x, int64_t K) {
  __m256 a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
  float s = hsum8(a);
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N])
torch::Tensor f32_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "f32_gemv: fp32 x and w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "f32_gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "f32_gemv: w must be contiguous");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat32 && b.numel() == N, "f32_gemv: bias must be fp32 [N]");
    bp = b.data_ptr<float>();
  }
  const int64_t K8 = K - K % 8, NB = (N + 3) / 4;
  at::parallel_for(0, NB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = 4 * blk;
      for (int64_t r = 0; r < M; ++r) {
        const float* xr = xp + r * K;
        float* yr = yp + r * N;
        if (n + 4 <= N) {
          const float* w0 = wp + n * K; const float* w1 = w0 + K; const float* w2 = w1 + K; const float* w3 = w2 + K;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t k = 0; k < K8; k += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
          }
          float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
          for (int64_t k = K8; k < K; ++k) {
            s[0] += w0[k] * xr[k]; s[1] += w1[k] * xr[k]; s[2] += w2[k] * xr[k]; s[3] += w3[k] * xr[k];
          }
          for (int j = 0; j < 4; ++j) yr[n + j] = s[j] + (bp ? bp[n + j] : 0.f);
        } else {
          for (int64_t j = n; j < N; ++j) yr[j] = dot1(wp + j * K, xr, K) + (bp ? bp[j] : 0.f);
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY_IMPL(leanfm, CPU, m) { m.impl("f32_gemv", &f32_gemv); }
"""

MAX_ROWS = 1  # the graph pass hands rows of x up to this to the kernel; more rows are a GEMM's job


def _shape(x, w, bias=None):
    return x.new_empty((x.shape[0], w.shape[0]))


define("f32_gemv(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", _shape)


def load():
    """The compiled function ``f32_gemv(x, w, bias)``, or a string saying why it is unavailable."""
    mod = build("f32_gemv", _SRC, ("f32_gemv",))
    return mod if isinstance(mod, str) else mod.f32_gemv
