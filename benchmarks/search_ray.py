"""Recipe search in-process vs on Ray (issue 15): same seed, same trials, same Pareto set?

    python benchmarks/search_ray.py [--model smollm2-135m] [--trials 8] [--population 4]
        [--methods rtn,hqq,wanda,layerdrop,embed_quant] [--out runs/search-ray]

Runs the same ``leanfm search`` twice, each with a store of its own (so neither reuses the
other's measurements): in this process at 1 thread, then with ``--executor ray --workers 2`` at
1 thread per worker (two trials at once on a 2-core machine). Prints each run's wall time,
whether both drew the same candidates with the same outcome, the Pareto membership of each,
and per measured trial both runs' ``ppl_increase`` (deterministic: must agree) and
``decode_tokens_per_s`` with its measured spread (min..max over the repeats). The protocol is
smaller than the acceptance search's (``--max-eval-tokens``, ``--repeats``) so both runs fit in
well under an hour; the flags are printed with the result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--methods", default="rtn,hqq,wanda,layerdrop,embed_quant")
    ap.add_argument("--budget", default="weight_bytes<=0.35x,ppl_increase<=40%")
    ap.add_argument("--protocol", default="--max-eval-tokens 4096 --seqlen 1024 --prompt 64 --gen 32 --repeats 5 --warmup 1")
    ap.add_argument("--out", default="runs/search-ray")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    leanfm = str(Path(sys.executable).with_name("leanfm"))
    common = [leanfm, "search", "--model", a.model, "--methods", a.methods, "--budget", a.budget,
              "--objective", "decode_tokens_per_s:max,ppl_increase:min", "--trials", str(a.trials),
              "--population", str(a.population), "--seed", "0", "--threads", "1", *a.protocol.split()]
    wall = {"local": run(common + ["--out", str(out / "local"), "--store", str(out / "local.sqlite")]),
            "ray": run(common + ["--out", str(out / "ray"), "--store", str(out / "ray.sqlite"), "--executor", "ray", "--workers", "2"])}
    res = {k: json.loads((out / k / "search.json").read_text()) for k in wall}
    loc, ray = res["local"], res["ray"]
    same_params = [t["params"] for t in loc["trials"]] == [t["params"] for t in ray["trials"]]
    same_status = [t["status"] for t in loc["trials"]] == [t["status"] for t in ray["trials"]]
    print(f"command: {' '.join(common[1:])} (+ --executor ray --workers 2 for the second run)")
    print(f"wall time: in-process {wall['local']:.0f} s, ray 2 workers x 1 thread {wall['ray']:.0f} s "
          f"({wall['local'] / wall['ray']:.2f}x)")
    print(f"same candidates drawn (params, in order): {same_params}; same outcome per trial: {same_status}")
    print(f"Pareto set: in-process {loc['front']}, ray {ray['front']}; same membership: {sorted(loc['front']) == sorted(ray['front'])}")
    print("| trial | recipe | status | ppl_increase local / ray | decode tok/s local (min..max) | decode tok/s ray (min..max) | within spread |")
    print("|---|---|---|---|---|---|---|")
    for tl, tr in zip(loc["trials"], ray["trials"]):
        if tl["status"] == "invalid" or tl["status"] == "rejected":
            continue
        steps = " + ".join(s["method"] for s in (tl["recipe"] or {}).get("steps", [])) + (f" ({tl['builtin']})" if tl.get("builtin") else "")
        ml, mr = tl["metrics"], tr["metrics"]
        ppl = f"{ml.get('ppl_increase', float('nan')):+.4f} / {mr.get('ppl_increase', float('nan')):+.4f}"
        if tl["status"] == "measured" and tr["status"] == "measured":
            sl, sr = _spread(out / "local", tl), _spread(out / "ray", tr)
            overlap = sl and sr and sl[0] <= sr[1] and sr[0] <= sl[1]
            speed = (f"{ml['decode_tokens_per_s']:.2f} ({sl[0]:.2f}..{sl[1]:.2f})" if sl else "?",
                     f"{mr['decode_tokens_per_s']:.2f} ({sr[0]:.2f}..{sr[1]:.2f})" if sr else "?", "yes" if overlap else "no")
        else:
            speed = ("–", "–", "–")
        print(f"| t{tl['trial']:03d} | {steps} | {tl['status']} / {tr['status']} | {ppl} | {' | '.join(speed)} |")


def _spread(search_dir: Path, t: dict) -> tuple[float, float] | None:
    """min..max of decode tokens/s over the repeats, from the trial's stage-2 results.json."""
    f = search_dir / "trials" / f"t{t['trial']:03d}" / "stage2" / "results.json"
    if not f.is_file():
        return None
    run = json.loads(f.read_text())["runs"][-1]
    d = run.get("details", {})
    lo, hi = d.get("decode_tokens_per_s_min"), d.get("decode_tokens_per_s_max")
    return (lo, hi) if lo is not None and hi is not None else None


if __name__ == "__main__":
    main()
