"""Re-measure a search's Pareto set with ``leanfm bench`` and compare it with the built-ins (issue 15).

    python benchmarks/search_front.py runs/search-acc15b [--threads 2] [--out runs/search-front]

1. Candidates from the built-ins: every built-in recipe and every ``a+b`` composition of two
   that the search's space can draw and the predictor lets through the search's budget (the
   same rule as the search's warm start, without its limit).
2. A short quality pass (``leanfm bench --metrics quality,memory`` on 4,096 tokens) of those not
   measured by the search itself drops the ones whose quality already misses the budget by more
   than the search's stop margin (25%, relative).
3. One ``leanfm bench`` run under the search's full protocol holds the Pareto set's recipes and
   every built-in candidate left, so their speed repeats are interleaved round by round.
4. Prints, per recipe, the objectives and budgeted metrics, whether it meets the budget, and for
   each Pareto member which built-ins meeting the budget dominate it (by the medians; a built-in
   with the member's very recipe is marked "same recipe": a difference between the two is
   measurement noise). The decode repeat range (min-max) is printed beside each median.
   ``--reprint`` prints the table again from the last run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("search_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/search-front")
    ap.add_argument("--stop-margin", type=float, default=0.25)
    ap.add_argument("--reprint", action="store_true", help="print the table again from <out>/full/results.json (no runs)")
    a = ap.parse_args()
    from leanfm.predict.analyzer import predict
    from leanfm.search.budget import Objective, dominates, parse_budget, parse_objectives
    from leanfm.search.run import _widths
    from leanfm.search.screen import predicted_metrics, screen
    from leanfm.search.seeds import candidates
    from leanfm.search.space import SearchSpace

    res = json.loads((Path(a.search_dir) / "search.json").read_text())
    budget = parse_budget(", ".join(res["budget"]).replace(" ", ""))
    objectives: list[Objective] = parse_objectives(",".join(res["objectives"]))
    proto = res["protocol"]
    model = res["model"]
    space = SearchSpace.from_methods()
    widths = _widths(model)
    base_pred = predicted_metrics(predict(model, "baseline", res["hardware"], proto["batch"], proto["prompt"], proto["gen"]))
    builtins = []
    for name, recipe, _ in candidates(space, widths):
        try:
            p = predicted_metrics(predict(model, recipe, res["hardware"], proto["batch"], proto["prompt"], proto["gen"]), base_pred)
        except Exception:  # noqa: BLE001 - a composition the predictor finds cannot run
            continue
        if screen(budget, p, base_pred, {}) is None:
            builtins.append(name)
    searched = {t["builtin"]: t for t in res["trials"] if t.get("builtin")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    leanfm = str(Path(sys.executable).with_name("leanfm"))
    base = res["baseline"]

    if a.reprint:
        return _table(json.loads((out / "full" / "results.json").read_text())["runs"], budget, objectives)
    short = [b for b in builtins if b not in searched]
    kept = [b for b in builtins if b in searched and _quality_ok(searched[b]["metrics"], budget, base, a.stop_margin)]
    if short:
        cmd = [leanfm, "bench", "--model", model, "--out", str(out / "short"), "--overwrite", "--metrics", "quality,memory",
               "--max-eval-tokens", "4096", "--threads", str(a.threads), *sum((["--recipe", b] for b in short), [])]
        subprocess.run(cmd, check=True)
        runs = json.loads((out / "short" / "results.json").read_text())["runs"]
        for r in runs[1:]:
            if r.get("status") != "error" and _quality_ok(r["metrics"], budget, r.get("baseline_metrics") or runs[0]["metrics"], a.stop_margin):
                kept.append(r["recipe"]["name"])
    front = sorted(Path(a.search_dir, "front").glob("*.yaml"))
    recipes = [str(f) for f in front] + kept
    flags = {"--dataset": proto.get("dataset"), "--split": proto.get("split"), "--seqlen": proto.get("seqlen"),
             "--max-eval-tokens": proto.get("max_eval_tokens"), "--max-fidelity-tokens": proto.get("max_fidelity_tokens"),
             "--batch": proto.get("batch"), "--prompt": proto.get("prompt"), "--gen": proto.get("gen"),
             "--repeats": proto.get("repeats"), "--warmup": proto.get("warmup"), "--dtype": proto.get("dtype")}
    cmd = [leanfm, "bench", "--model", model, "--out", str(out / "full"), "--overwrite", "--threads", str(a.threads),
           *sum(([k, str(v)] for k, v in flags.items() if v is not None), []), *sum((["--recipe", r] for r in recipes), [])]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    _table(json.loads((out / "full" / "results.json").read_text())["runs"], budget, objectives)


def _spread(run: dict, metric: str) -> tuple[float, float] | None:
    d = run.get("details") or {}
    lo, hi = d.get(f"{metric}_min"), d.get(f"{metric}_max")
    return (lo, hi) if lo is not None and hi is not None else None


def _table(runs: list[dict], budget, objectives) -> None:
    from leanfm.search.budget import dominates

    base = runs[0]["metrics"]
    rows = []
    for r in runs[1:]:
        m = r.get("metrics") or {}
        ok = all(c.holds(m, base) for c in budget) if r.get("status") != "error" else False
        rows.append({"name": r["recipe"]["name"], "front": r["recipe"]["name"].startswith("search-t"), "metrics": m,
                     "meets": ok, "run": r, "steps": [{k: v for k, v in st.items()} for st in r["recipe"]["steps"]]})
    cols = [o.metric for o in objectives] + [c.metric for c in budget if c.metric not in [o.metric for o in objectives]]
    print("\nbaseline: " + ", ".join(f"{c} {base.get(c, float('nan')):.4g}" for c in cols))
    print("| recipe | " + " | ".join(cols) + " | decode tok/s range | meets budget | built-ins meeting the budget that dominate it |")
    print("|---|" + "---|" * (len(cols) + 3))
    ok_builtins = [x for x in rows if not x["front"] and x["meets"]]
    for x in rows:
        vals = " | ".join(f"{x['metrics'].get(c, float('nan')):.4g}" for c in cols)
        sp = _spread(x["run"], "decode_tokens_per_s")
        rng = f"{sp[0]:.2f}-{sp[1]:.2f}" if sp else "?"
        if x["front"]:
            dom = ", ".join(b["name"] + (" (same recipe)" if b["steps"] == x["steps"] else "") for b in ok_builtins
                            if dominates(b["metrics"], x["metrics"], objectives)) or "none"
        else:
            dom = "–"
        print(f"| {'**' + x['name'] + '**' if x['front'] else x['name']} | {vals} | {rng} | {'yes' if x['meets'] else 'no'} | {dom} |")


def _quality_ok(m: dict, budget, base: dict, margin: float) -> bool:
    from leanfm.metrics import METRICS

    return all((c.violation(m, base) or 0) <= margin for c in budget if METRICS[c.metric].group == "quality")


if __name__ == "__main__":
    main()
