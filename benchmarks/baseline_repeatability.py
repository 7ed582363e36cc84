"""Two back-to-back baseline runs in one invocation: does decode_tokens_per_s repeat within 10%?

    python benchmarks/baseline_repeatability.py [--model smollm2-135m] [--threads 2] [--write docs/benchmarks.md]

Each run loads the model fresh and runs the speed protocol (warm-up, repeats, pinned threads).
Prints both medians with their min–max spread, the ratio, and the load average around the runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdsection import write_section  # noqa: E402

from leanfm.bench import bench  # noqa: E402
from leanfm.measure.protocol import Protocol  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--write", default=None, help="markdown file to update (section baseline-repeatability)")
    a = ap.parse_args()
    proto = Protocol(groups=("speed",), threads=a.threads, repeats=a.repeats, gen=a.gen, prompt=a.prompt)
    rows = []
    load = [os.getloadavg()[0]]
    for i in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            res = bench(a.model, ["baseline"], proto, Path(d))
        run = res["runs"][0]
        rows.append((i, run["metrics"], run["details"]))
        load.append(os.getloadavg()[0])
    r1, r2 = rows[0][1]["decode_tokens_per_s"], rows[1][1]["decode_tokens_per_s"]
    ratio = r2 / r1
    ok = abs(ratio - 1) <= 0.10
    lines = [
        f"Command: `python benchmarks/baseline_repeatability.py --model {a.model} --threads {a.threads}`",
        f"(torch threads {a.threads}; batch 1, prompt {a.prompt}, gen {a.gen}, 1 warm-up + {a.repeats} repeats per run; "
        f"1-min load average before/between/after: {', '.join(f'{x:.2f}' for x in load)})",
        "",
        "| run | decode tokens/s (median) | min – max over repeats | TPOT p50 ms | prefill ms |",
        "|---|---|---|---|---|",
    ]
    for i, m, d in rows:
        lines.append(f"| {i} | {m['decode_tokens_per_s']:.2f} | {d['decode_tokens_per_s_min']:.2f} – {d['decode_tokens_per_s_max']:.2f} "
                     f"| {m['tpot_ms_p50']:.2f} | {m['prefill_ms']:.1f} |")
    lines += ["", f"run 2 / run 1 = **{ratio:.3f}** → {'within' if ok else 'OUTSIDE'} the ±10% target"]
    body = "\n".join(lines)
    print(body)
    if a.write:
        write_section(a.write, "baseline-repeatability", "## Baseline repeatability (decode speed)\n\n" + body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
