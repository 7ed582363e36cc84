"""``leanfm search`` flags and output (the parser lives in :mod:`leanfm.cli`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LeanfmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--budget", default="", help="constraints over results-schema metrics, comma-separated, with units: "
                   "'weight_bytes<=80MB,ppl_increase<=15%%'; 0.3x = 0.3 times the baseline's value")
    g.add_argument("--objective", default=None,
                   help="metrics to optimize, metric:max|min, comma-separated (default for a causal LM "
                        "decode_tokens_per_s:max,ppl_increase:min; vit images_per_s:max,knn_accuracy:max; clip "
                        "images_per_s:max,zero_shot_accuracy:max; diffusion models samples_per_s:max,ssim:max)")
    g.add_argument("--trials", type=int, default=24,
                   help="candidates to run, at least through the short quality pass (default 24); draws the predictor "
                        "rejects or finds invalid are recorded but not counted (at most 20 draws per trial)")
    g.add_argument("--population", type=int, default=8, help="NSGA-II generation size (default 8)")
    g.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    g.add_argument("--methods", default=None, help="narrow the space to these methods, comma-separated (default: every method "
                   "that declares a search space; see leanfm methods)")
    g.add_argument("--space", default=None, help="YAML search space (methods with dimensions, require); overrides --methods")
    g.add_argument("--require", default="", help="groups every candidate must use, comma-separated (e.g. int-weights)")
    g.add_argument("--hardware", default="local", help="hardware profile the predictor screens for (default local)")
    g.add_argument("--store", default=None, help="results store (SQLite; default $LEANFM_CACHE/results.sqlite)")
    g.add_argument("--screen-share", type=float, default=0.25,
                   help="share of --max-eval-tokens for the short quality pass that stops hopeless candidates (default 0.25)")
    g.add_argument("--warm-start", default="builtin", choices=["builtin", "none"],
                   help="builtin (default): the first trials (at most half of --trials) are the built-in recipes, and pairs "
                        "of them joined with '+', that the space can draw and the predictor lets through the budget, gentlest "
                        "first; NSGA-II breeds the rest from them. none: every trial is drawn by the sampler")
    g.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where trials run: local (one after another, in this process) or ray (--workers at once; default local)")
    g.add_argument("--workers", type=int, default=2, help="ray: trials measured at once, each on --threads cores (default 2)")
    g.add_argument("--address", default=None, help="ray: address of an existing cluster (default: start a local one)")


def build(a, protocol, calib_samples, calib_seqlen, calib_dataset="gensim-wiki"):
    from .budget import parse_budget, parse_objectives
    from .run import Search
    from .space import SearchSpace

    from ..config import check_family, config_class
    from ..models.family import family_of_name

    family = family_of_name(a.model)
    require = [r for r in a.require.split(",") if r.strip()]
    if a.space:
        path = Path(a.space)
        if not path.is_file():
            raise LeanfmError(f"--space {a.space}: no such file; give a YAML search space (see docs/search.md)")
        space = SearchSpace.from_yaml(path.read_text(), str(path))
        for m in space.dims:
            check_family(config_class(m), family)
    else:
        names = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
        space = SearchSpace.from_methods(names, require=require, seed=a.seed, family=family)
    budget = parse_budget(a.budget) if a.budget.strip() else []
    objective = a.objective or DEFAULT_OBJECTIVES[family]
    return Search(model=a.model, space=space, budget=budget, objectives=parse_objectives(objective), protocol=protocol,
                  out=Path(a.out), trials=a.trials, seed=a.seed, population=a.population, hardware=a.hardware,
                  store=Path(a.store) if a.store else None, screen_share=a.screen_share, executor=a.executor, workers=a.workers, address=a.address,
                  budget_text=a.budget, objective_text=objective, calib_dataset=calib_dataset, calib_samples=calib_samples,
                  calib_seqlen=calib_seqlen, warm_start=a.warm_start, family=family)


# what a search optimizes when --objective is not given: speed in the family's unit and its quality
DEFAULT_OBJECTIVES = {"causal-lm": "decode_tokens_per_s:max,ppl_increase:min", "vit": "images_per_s:max,knn_accuracy:max",
                      "clip": "images_per_s:max,zero_shot_accuracy:max", "diffusion": "samples_per_s:max,ssim:max",
                      "diffusion-pipeline": "samples_per_s:max,ssim:max"}


def render(res: dict) -> str:
    c = res["counts"]
    lines = [f"search {res['search_id'][:12]}: {res['trials_requested']} trials: {c['rejected']} rejected by the predictor, "
             f"{c['invalid']} invalid, {c['stopped']} stopped after the short quality pass, {c['measured']} measured, "
             f"{c['failed']} failed; {res['measured_now']} measurements now, {res['cached']} reused from the store",
             f"budget: {', '.join(res['budget']) or 'none'}; objectives: {', '.join(res['objectives'])}",
             "Pareto set (feasible, non-dominated):"]
    by = {t["trial"]: t for t in res["trials"]}
    for n in res["front"]:
        t = by[n]
        steps = " + ".join(f"{s['method']}({', '.join(f'{k}={v}' for k, v in s.items() if k in _SHOWN)})" for s in t["recipe"]["steps"]) or "baseline"
        vals = ", ".join(f"{o.split(':')[0]} {t['metrics'].get(o.split(':')[0], float('nan')):.4g}" for o in res["objectives"])
        seed = f" (built-in {t['builtin']})" if t.get("builtin") else ""
        lines.append(f"  t{n:03d}{seed}: {steps}: {vals}")
    if not res["front"]:
        lines.append("  (no measured candidate met the budget; raise --trials or relax --budget)")
    return "\n".join(lines)


_SHOWN = {"bits", "group_size", "symmetric", "sparsity", "pattern", "fraction", "mlp_fraction", "param_ratio", "budget", "k",
          "threshold", "alpha", "act_order", "r", "keep_rate", "steps", "interval", "activations", "order", "ratio"}
