"""Per-layer mixed precision (issue 15): what a curve over several budgets costs.

    python benchmarks/mixed_precision.py [--model smollm2-135m] [--recipe benchmarks/recipes/mixed-w4g64-asym.yaml]
        [--budgets 4.55,w4g64,4.75,5.0,5.5] [--calib-samples 64] [--calib-seqlen 512] [--threads 2]

Scores every (layer, format) of the recipe's mixed_precision step once (timed, with an empty
score cache), then solves the allocation for each budget from those scores (each solve timed,
no re-scoring: the second lookup of the scores must come from the cache). A budget is a uniform
format name (the bytes it stores for the same layers) or average stored bits per weight. Prints
one row per budget: bytes, bits per weight, the formats chosen and the summed score.

Quality at one budget is measured by ``leanfm bench`` (the command is in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="benchmarks/recipes/mixed-w4g64-asym.yaml")
    ap.add_argument("--budgets", default="4.55,w4g64,4.75,5.0,5.5")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import dataclasses
    from pathlib import Path

    import torch

    import leanfm
    from leanfm.methods.mixed.apply import _shapes, check_mixed, sibling_groups, solve
    from leanfm.methods.mixed.decl import budget_bytes
    from leanfm.methods.mixed import score
    from leanfm.methods.mixed.score import scores_for

    empty = Path(tempfile.mkdtemp(prefix="leanfm-sensitivity-"))
    score.cache_dir = lambda: empty  # an empty score cache, so the one scoring pass is timed

    torch.set_num_threads(a.threads)
    cfg = leanfm.load_recipe(a.recipe).steps[0]
    model, tok = leanfm.load(a.model)
    ids = leanfm.calibration("gensim-wiki", n=a.calib_samples, seqlen=a.calib_seqlen).tokens(tok)
    targets, cands, _ = check_mixed(cfg, model)
    shapes = _shapes(targets)
    score_ids = ids[: max(1, cfg.score_tokens // ids.shape[1])]
    fmts = [f.name for f in cfg.parsed_formats()]
    scores, cached, secs, _ = scores_for(model, targets, cands, cfg.symmetric, score_ids, fmts)
    assert not cached, "the score cache was not empty"
    groups = sibling_groups(model, targets, ids)
    params = sum(i * o for i, o in shapes.values())
    print(f"model {a.model}, threads {a.threads}, formats {', '.join(fmts)} (symmetric={cfg.symmetric}), "
          f"{len(targets)} linears, score tokens {score_ids.numel()}: scoring pass {secs:.1f} s")
    print("| budget | bytes (MB) | bits/weight | formats chosen | summed score | re-scored? | solve s |")
    print("|---|---|---|---|---|---|---|")
    for b in a.budgets.split(","):
        b = b.strip()
        c = dataclasses.replace(cfg, budget_like=b, avg_bits=None) if b.startswith("w") else \
            dataclasses.replace(cfg, budget_like=None, avg_bits=float(b))
        t0 = time.perf_counter()
        sc, hit, _, _ = scores_for(model, targets, cands, c.symmetric, score_ids, fmts)
        alloc = solve(sc, cands, shapes, budget_bytes(c, shapes), groups)
        dt = time.perf_counter() - t0
        stored = sum(alloc[n].bytes(*shapes[n]) for n in targets)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(f.name for f in alloc.values()).items()))
        total = sum(sc[n][f.name] for n, f in alloc.items())
        print(f"| {b} | {stored / 1e6:.2f} | {8 * stored / params:.3f} | {counts} | {total:.4g} | {'no' if hit else 'YES'} | {dt:.2f} |")


if __name__ == "__main__":
    main()
