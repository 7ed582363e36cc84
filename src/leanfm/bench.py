"""``leanfm bench``: for each recipe load fresh, apply, measure; baseline always first.

Speed, memory and energy are measured with only the model under test resident; the unmodified
reference is loaded afterwards for the fidelity metrics, so ``peak_rss_bytes`` is not inflated
by it. results.json is rewritten after every run, so an interrupted bench loses nothing.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path

import torch

from . import progress
from .api import apply_
from .data.calib import Calibration
from .errors import LeanfmError
from .measure.cost import load_profile
from .measure.environment import environment
from .measure.protocol import Protocol
from .measure.quality import make_windows
from .measure.run import check_seqlen, eval_ids, measure
from .models.load import load
from .predict.versus import compare, prediction_for_run
from .recipe import Recipe, load_recipe, recipe_file_stem
from .results import add_relative_metrics, new_results, write


def order_recipes(names: list[str | Recipe]) -> list[Recipe]:
    """Parse every recipe up front (fail before any work) and put the baseline first."""
    recipes = [load_recipe(n) for n in names]
    base = [r for r in recipes if not r.steps]
    rest = [r for r in recipes if r.steps]
    return [base[0] if base else load_recipe("baseline")] + rest


def _oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "not enough memory" in str(e) or "out of memory" in str(e).lower()


def _reused_baseline(path: str | Path, model_name: str, protocol: Protocol) -> dict:
    """The baseline run of an earlier results.json with the same model and protocol."""
    from .results import read

    prev = read(path)
    mine, theirs = protocol.to_dict(), dict(prev.get("protocol") or {})
    if tuple(protocol.groups) == ("quality",):  # thread count does not change quality metrics
        mine.pop("threads"), theirs.pop("threads", None)
    if prev.get("model") != model_name or theirs != mine:
        raise LeanfmError(f"cannot reuse the baseline in {path}: it was measured with another model or protocol")
    run = dict(prev["runs"][0])
    if run.get("status") != "ok" or run["recipe"].get("steps"):
        raise LeanfmError(f"cannot reuse the baseline in {path}: its first run is not a successful baseline")
    run["reused_from"] = str(path)
    return run


def bench(model_name: str, recipe_names: list[str | Recipe], protocol: Protocol, out: str | Path,
          calib: Calibration | None = None, profile_path: str | None = None, reuse_baseline: str | Path | None = None) -> dict:
    """Run every recipe on ``model_name`` under ``protocol``; the baseline first (measured, or
    copied from the results.json directory ``reuse_baseline`` when model and protocol match)."""
    protocol.validate()
    recipes = order_recipes(recipe_names)
    profile = load_profile(profile_path)
    calib = calib or Calibration()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(protocol.threads)
    results = new_results(environment(protocol.threads, seed=recipes[0].seed), protocol.to_dict())
    results["model"] = model_name
    results["hardware_profile"] = profile
    for r in recipes:
        r.save(out / "recipes" / f"{recipe_file_stem(r.name)}.yaml")

    model, tok = load(model_name)
    config = model.config.to_dict()  # the architecture before any recipe changes it (for predictions)
    check_seqlen(model, protocol)
    for r in recipes:  # fail on an impossible recipe before measuring anything
        for step in r.steps:
            step.check_model(model)
    ids = eval_ids(tok, protocol)
    if "quality" in protocol.groups:  # a too-small --max-eval-tokens fails now, not after the speed runs
        make_windows(ids, protocol.seqlen, protocol.max_eval_tokens, None)
    speed_groups = tuple(g for g in protocol.groups if g != "quality")
    for i, recipe in enumerate(recipes):
        if i == 0 and reuse_baseline is not None:
            results["runs"].append({**_reused_baseline(reuse_baseline, model_name, protocol), "id": 0})
            write(results, out)
            continue
        run = {"id": i, "model": model_name, "recipe": recipe.to_dict(), "status": "running"}
        results["runs"].append(run)
        try:
            progress.info(f"[{i + 1}/{len(recipes)}] {recipe.name}")
            if i > 0:
                model, _ = load(model_name)
            t0 = time.perf_counter()
            calib_ids, run["calibration"] = recipe.calibration(calib, tok)
            apply_(model, recipe, calib=calib_ids)
            run["apply_seconds"] = round(time.perf_counter() - t0, 3)
            res = {"metrics": {}, "details": {}, "flags": {}}
            if speed_groups:
                res = measure(model, tok, dataclasses.replace(protocol, groups=speed_groups), profile=profile, ids=ids)
            if "quality" in protocol.groups:
                ref = load(model_name)[0] if i > 0 else None
                q = measure(model, tok, dataclasses.replace(protocol, groups=("quality",)), reference=ref, profile=profile, ids=ids)
                del ref
                res["metrics"].update(q["metrics"])
                res["details"].update(q["details"])
                res["flags"] = q["flags"]
                if i == 0:  # the baseline is the reference: identical by definition
                    res["metrics"].update(top1_agreement=1.0, kl_to_baseline=0.0)
            if speed_groups:  # the roofline prediction next to the measurement (docs/predict.md)
                pred = prediction_for_run(config, recipe, protocol.batch, protocol.prompt, protocol.gen, protocol.threads)
                res["details"]["prediction"] = pred
                if "error" in pred:  # recorded, and said: never a silent gap in the table
                    progress.info(f"no roofline prediction for {recipe.name}: {pred['error']}")
                res["metrics"].update(compare(pred, res["metrics"]))
            run.update(metrics=res["metrics"], details=res["details"], flags=res["flags"], status="ok")
            add_relative_metrics(run, results["runs"][0] if i > 0 else None)
        except (LeanfmError, RuntimeError, MemoryError) as e:
            run.update(status="error", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            results["environment"]["load_average_after"] = list(os.getloadavg())
            write(results, out)
            if _oom(e):
                raise LeanfmError(f"out of memory in recipe {recipe.name}; lower --batch/--seqlen or use a smaller model (runs so far saved in {out}/results.json)") from None
            if isinstance(e, LeanfmError):
                raise LeanfmError(f"{e} (runs so far saved in {out}/results.json)") from None
            raise
        write(results, out)
        del model
        gc.collect()
    results["environment"]["load_average_after"] = list(os.getloadavg())
    write(results, out)
    return results
