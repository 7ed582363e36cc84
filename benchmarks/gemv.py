"""One-row matmul kernels on SmolLM2-135M's layer shapes: aten vs leanfm's C++ GEMVs, side by side.

    python benchmarks/gemv.py [--threads 2] [--repeats 7] [--budget-mb 96]

For each shape (q/o, k/v, fused q/k/v, gate/up, fused gate/up, down, the head), enough copies of
the weight to exceed the last-level cache are cycled so every call reads its weight from memory,
as in decode. Timers run interleaved (aten fp32, leanfm fp32, leanfm int4 g64), ``--repeats``
rounds after a warm-up; printed: median microseconds per call (min-max) and the weight bytes
read per second. The int4 bytes count the packed codes plus the fp32 scale and offset per group.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "qkv fused": (960, 576), "gate/up": (1536, 576),
          "gate+up fused": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
G = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget-mb", type=float, default=96.0, help="fp32 bytes cycled per shape (beyond the LLC)")
    a = ap.parse_args()
    from leanfm.kernels import cpp_gemv, cpp_int4

    torch.set_num_threads(a.threads)
    f32, i4 = cpp_gemv.load(), cpp_int4.load()
    for fn, name in ((f32, "cpp-gemv"), (i4, "cpp-int4")):
        if isinstance(fn, str):
            raise SystemExit(f"{name}: {fn}")
    print(f"{a.threads} threads, torch {torch.__version__}, {a.repeats} interleaved rounds after a warm-up")
    print("| layer | N x K | aten fp32 us (GB/s) | leanfm fp32 us (GB/s) | leanfm int4 g64 us (GB/s) | leanfm / aten fp32 |")
    print("|---|---|---|---|---|---|")
    for label, (n, k) in SHAPES.items():
        copies = max(2, int(a.budget_mb * 2**20 // (n * k * 4)))
        ws = [torch.randn(n, k) for _ in range(copies)]
        codes = [torch.randint(0, 16, (n, k), dtype=torch.uint8) for _ in range(copies)]
        packed = [cpp_int4.pack(c, G) for c in codes]
        sc = [torch.rand(n, k // G) + 0.1 for _ in range(copies)]
        mz = [torch.randn(n, k // G) for _ in range(copies)]
        x = torch.randn(1, k)
        torch.testing.assert_close(f32(x, ws[0], None), F.linear(x, ws[0]), rtol=1e-4, atol=1e-3)
        timers = {"aten": lambda i: F.linear(x, ws[i]), "f32": lambda i: f32(x, ws[i], None),
                  "int4": lambda i: i4(x, packed[i], sc[i], mz[i], G)}
        times: dict[str, list[float]] = {t: [] for t in timers}
        for r in range(1 + a.repeats):
            for t, f in timers.items():
                t0 = time.perf_counter()
                for i in range(copies):
                    f(i)
                if r:
                    times[t].append((time.perf_counter() - t0) / copies)
        nbytes = {"aten": n * k * 4, "f32": n * k * 4, "int4": n * k // 2 + 8 * n * (k // G)}
        cell = {t: f"{statistics.median(v) * 1e6:.0f} ({min(v) * 1e6:.0f}-{max(v) * 1e6:.0f}) us, "
                   f"{nbytes[t] / statistics.median(v) / 1e9:.1f} GB/s" for t, v in times.items()}
        print(f"| {label} | {n} x {k} | {cell['aten']} | {cell['f32']} | {cell['int4']} | "
              f"{statistics.median(times['aten']) / statistics.median(times['f32']):.2f}x |")


if __name__ == "__main__":
    main()
