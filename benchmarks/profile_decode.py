"""Profile decode steps of a quantized model: where does a step's time go?

    python benchmarks/profile_decode.py [--model smollm2-135m] [--threads 2] [--steps 10]

Applies RTN int4 g64 to the linears and int8 to the LM head (int4-fast's formats, without its
calibration), runs a 128-token prefill and warm-up steps, then profiles ``--steps`` decode steps
with torch.profiler and prints wall ms per step and the top aten ops by self CPU time. Wall time
minus the ops' total is the Python-side overhead of the model's forward.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import leanfm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = leanfm.load(a.model)
    leanfm.apply_(model, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False})
    leanfm.apply_(model, {"method": "rtn", "bits": 8, "only": ["lm_head"], "skip": []})
    ids = torch.randint(0, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            cache = model(input_ids=nxt, past_key_values=cache, use_cache=True).past_key_values
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                cache = model(input_ids=nxt, past_key_values=cache, use_cache=True).past_key_values
            wall = (time.perf_counter() - t0) / a.steps * 1e3
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / a.steps / 1e3
    print(f"threads {a.threads}: {wall:.1f} ms per decode step (wall), aten ops {ops:.1f} ms, other (Python) {wall - ops:.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
