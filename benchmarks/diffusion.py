"""Diffusion techniques on ``terrain-cm`` (issue 19): fewer steps, int8, DeepCache — speed per sample
and fidelity to the fp32 model on the same seeds.

    python benchmarks/diffusion.py [--seeds 32] [--batch 8] [--steps 1,4,8] [--interval 2]
        [--calib-seeds 8] [--threads 2] [--out runs/diffusion]

The packaged consistency UNet runs in ONNX Runtime (CPU provider, ``--threads`` intra-op threads).
Samples: multistep consistency sampling (Song et al., 2023, Algorithm 1), the noise of every step
drawn up front from the sample's seed (seeds 0..N-1), difficulty 10, 30, 50, 70 or 90 by seed.
Variants, for each step count: ``fp32`` (the shipped graph, the reference), ``int8-weights``
(weight-only: per-channel int8 codes behind DequantizeLinear, fp32 compute), ``w8a8`` (ONNX
Runtime static QDQ quantization of the Conv/Gemm/MatMul nodes: per-channel int8 weights, uint8
activations calibrated by min-max on ``--calib-seeds`` noisy inputs at the sampler's noise
levels, seeds disjoint from the evaluated ones), and with 2+ steps ``deepcache`` (full UNet every
``--interval`` steps, the shallow path with the cached deep feature in between) and
``int8-weights+deepcache``. Fidelity: PSNR and
SSIM of each sample against the fp32 sample of the same seed and step count (data range: the
fp32 set's max - min), and the Wasserstein-1 distance between the two sets' pooled values; a
fewer-steps row compares fp32 at the smallest step count with fp32 at the largest. Speed: one
batch of ``--batch`` seeds per variant per round, variants interleaved round by round, one
warm-up batch; ms per sample from the median batch time. Writes ``<out>/diffusion.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", default="1,4,8")
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--calib-seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/diffusion")
    a = ap.parse_args()

    import numpy as np
    import onnx

    from leanfm.measure.image_quality import psnr, ssim, value_w1
    from leanfm.methods.diffusion.deepcache import CachedDenoiser, split
    from leanfm.methods.diffusion.int8_onnx import calibration_feeds, quantize_int8, weight_only_int8
    from leanfm.methods.diffusion.sampling import consistency_sample, draw_noise, step_sigmas
    from leanfm.models import terrain_cm as tc

    steps_list = [int(s) for s in a.steps.split(",")]
    if a.seeds % a.batch:
        raise SystemExit(f"--seeds {a.seeds} must be a multiple of --batch {a.batch}")
    proto = onnx.load(str(tc.onnx_path()))
    fp32_bytes = proto.SerializeToString()
    conds = [10.0, 30.0, 50.0, 70.0, 90.0]
    calib_sigmas = sorted({float(s) for n in steps_list for s in step_sigmas(n, tc.SIGMA_MIN, tc.SIGMA_MAX)})
    t0 = time.perf_counter()
    feeds = calibration_feeds(list(range(1000, 1000 + a.calib_seeds)), calib_sigmas, conds, (1, tc.SIZE, tc.SIZE), tc.SIGMA_DATA)
    int8_bytes = quantize_int8(fp32_bytes, feeds)
    quant_s = time.perf_counter() - t0
    full, shallow, tensor = split(proto)
    w8_bytes = weight_only_int8(proto)[0].SerializeToString()
    full_w8, shallow_w8 = weight_only_int8(full)[0], weight_only_int8(shallow)[0]
    files = {"fp32": fp32_bytes, "int8-weights": w8_bytes, "w8a8": int8_bytes}
    den = {k: tc.OnnxDenoiser(v, a.threads) for k, v in files.items()}
    cached = {"deepcache": CachedDenoiser(tc.OnnxDenoiser(full.SerializeToString(), a.threads, extra=(tensor,)),
                                          tc.OnnxDenoiser(shallow.SerializeToString(), a.threads), tensor, a.interval),
              "int8-weights+deepcache": CachedDenoiser(tc.OnnxDenoiser(full_w8.SerializeToString(), a.threads, extra=(tensor,)),
                                                       tc.OnnxDenoiser(shallow_w8.SerializeToString(), a.threads), tensor, a.interval)}
    files["deepcache"] = fp32_bytes
    files["int8-weights+deepcache"] = w8_bytes
    seeds = list(range(a.seeds))
    cond = np.array([conds[s % len(conds)] for s in seeds], np.float32)
    shape = (1, tc.SIZE, tc.SIZE)
    variants = [(n, name) for n in steps_list for name in (*den, *(cached if n >= 2 else ()))]

    def run(n, name, idx):
        sig = step_sigmas(n, tc.SIGMA_MIN, tc.SIGMA_MAX)
        noise = draw_noise([seeds[i] for i in idx], n, shape)
        d = den.get(name) or cached[name]
        if hasattr(d, "reset"):
            d.reset()
        return consistency_sample(d, noise, cond[idx], sig, tc.SIGMA_MIN)

    outs = {v: np.zeros((a.seeds, *shape), np.float32) for v in variants}
    times = {v: [] for v in variants}
    batches = [list(range(i, i + a.batch)) for i in range(0, a.seeds, a.batch)]
    for v in variants:  # warm-up: first runs allocate and plan
        run(*v, batches[0])
    for idx in batches:
        for v in variants:
            t = time.perf_counter()
            outs[v][idx] = run(*v, idx)
            times[v].append(time.perf_counter() - t)

    rows = []
    for n, name in variants:
        ref = outs[(n, "fp32")]
        rng = float(ref.max() - ref.min())
        x = outs[(n, name)]
        per = [(psnr(x[i], ref[i], rng), ssim(x[i, 0], ref[i, 0], rng)) for i in range(a.seeds)]
        ms = 1e3 * statistics.median(times[(n, name)]) / a.batch
        rows.append({"steps": n, "variant": name, "ms_per_sample": ms, "ms_min": 1e3 * min(times[(n, name)]) / a.batch,
                     "ms_max": 1e3 * max(times[(n, name)]) / a.batch,
                     "psnr_db": statistics.mean(p for p, _ in per), "ssim": statistics.mean(s for _, s in per),
                     "value_w1": value_w1(x, ref), "data_range": rng, "file_bytes": len(files[name])})
    base = {r["steps"]: r["ms_per_sample"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        r["speedup"] = base[r["steps"]] / r["ms_per_sample"]
    lo, hi = min(steps_list), max(steps_list)
    fewer = None
    if lo != hi:
        ref, x = outs[(hi, "fp32")], outs[(lo, "fp32")]
        rng = float(ref.max() - ref.min())
        fewer = {"steps": lo, "against_steps": hi, "psnr_db": statistics.mean(psnr(x[i], ref[i], rng) for i in range(a.seeds)),
                 "ssim": statistics.mean(ssim(x[i, 0], ref[i, 0], rng) for i in range(a.seeds)), "value_w1": value_w1(x, ref),
                 "speedup": base[hi] / base[lo]}
    print(f"terrain-cm, ONNX Runtime CPU, {a.threads} threads; {a.seeds} seeds, batch {a.batch}, {len(batches)} rounds "
          f"(+1 warm-up); DeepCache caches '{tensor}' every {a.interval} steps; int8 quantization took {quant_s:.1f} s")
    print("| steps | variant | model MB | ms/sample (min-max) | speedup vs fp32 | PSNR dB | SSIM | value W1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['variant']} | {r['file_bytes'] / 1e6:.1f} | {r['ms_per_sample']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
              f"{r['speedup']:.2f}x | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['value_w1']:.4f} |")
    if fewer:
        print(f"- fewer steps: fp32 at {lo} step(s) against fp32 at {hi}: PSNR {fewer['psnr_db']:.2f} dB, SSIM {fewer['ssim']:.4f}, "
              f"value W1 {fewer['value_w1']:.4f}, {fewer['speedup']:.2f}x faster")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion.json").write_text(json.dumps({"args": vars(a), "cache_tensor": tensor, "quantize_seconds": quant_s,
                                                    "rows": rows, "fewer_steps": fewer}, indent=1))


if __name__ == "__main__":
    main()
