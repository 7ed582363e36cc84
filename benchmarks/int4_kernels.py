"""Per-layer decode kernels side by side: fp32 dense, int8pack, tinygemm int4, leanfm cpp-int4.

    python benchmarks/int4_kernels.py [--threads 2] [--repeats 7]

For each linear shape of SmolLM2-135M (fused q/k/v 960x576, o 576x576, fused gate/up 3072x576,
down 576x1536, LM head 49152x576) and one token, times one ``QuantLinear`` call per backend
(RTN weights, int4 groups of 64 asymmetric; int8 per-channel symmetric) and ``F.linear`` on the
fp32 weight, interleaving backends in each repeat; prints the median µs, the spread, and the
effective GMAC/s. Weights are hot in cache here (the same layer is called in a loop), so this
isolates kernel compute from DRAM traffic; the decode benchmark measures the whole model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from leanfm.kernels.qlinear import QuantLinear
from leanfm.methods.quantize.grid import rtn_quantize

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


def _time(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads {a.threads}, repeats {a.repeats} (interleaved), one token; median µs (min–max), GMAC/s")
    print("| layer [out, in] | fp32 F.linear | int8pack | tinygemm-int4 | cpp-int4 | cpp-int4 vs tinygemm |")
    print("|---|---|---|---|---|---|")
    for n_out, n_in in SHAPES:
        w = torch.randn(n_out, n_in) * 0.02
        layers = {
            "int8pack": QuantLinear(rtn_quantize(w, 8, None, True), None, "int8pack"),
            "tinygemm-int4": QuantLinear(rtn_quantize(w, 4, 64, False), None, "tinygemm-int4"),
            "cpp-int4": QuantLinear(rtn_quantize(w, 4, 64, False), None, "cpp-int4"),
        }
        x = torch.randn(1, 1, n_in)
        fns = {"fp32 F.linear": lambda: F.linear(x, w), **{k: (lambda m=m: m(x)) for k, m in layers.items()}}
        n = 50 if n_out > 10000 else 500
        times = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                _time(f, 10)
            for _ in range(a.repeats):
                for k, f in fns.items():
                    times[k].append(_time(f, n))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[k]:.1f} ({min(v):.1f}–{max(v):.1f}), {n_out * n_in / med[k] / 1e3:.1f}" for k, v in times.items()]
        print(f"| [{n_out}, {n_in}] | " + " | ".join(cells) + f" | {med['tinygemm-int4'] / med['cpp-int4']:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
