"""``leanfm tune`` / ``leanfm.tune``: compress (optionally), fine-tune, and measure before and after.

Runs, in one results.json under the standard protocol (docs/results-schema.md):
0. ``baseline``: the model as loaded;
1. the compression recipe (``--recipe``), when given: the model the tuning starts from;
2. the recipe plus the tuning step, trained on the compressed model of run 1 (not compressed
   again): quality and inference memory after training, plus the
   training metrics measured around the tuning step alone (``peak_train_rss_bytes``,
   ``train_seconds``, ``train_tokens_per_s``, ``train_energy_j``, ``trainable_params``) and
   ``ppl_gap_recovered`` when a recipe opened a gap.
The tuned model (adapters merged) is saved to ``<out>/checkpoint``, a plain Hugging Face folder
that ``leanfm eval`` and transformers load.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import torch

from .. import progress
from ..api import apply_
from ..config import BaseConfig, config_from_dict
from ..data.calib import Calibration
from ..errors import LeanfmError
from ..measure import memory as mem
from ..measure.cost import load_profile
from ..measure.energy import EnergyMeter
from ..measure.environment import environment
from ..measure.protocol import Protocol
from ..measure.run import eval_ids, measure
from ..models.load import load
from ..outdir import OutputDir
from ..recipe import Recipe, load_recipe
from ..results import add_relative_metrics, new_results, write

GROUPS = ("quality", "memory")


def tune_config(step: BaseConfig | dict) -> BaseConfig:
    """The tuning step, validated; one line when it is not a tuning method."""
    cfg = config_from_dict(step) if isinstance(step, dict) else step
    if cfg.produces != "tuned-weights":
        raise LeanfmError(f"{cfg.method} is not a fine-tuning method; use one of lora, dora, qlora, full, kd, mezo "
                          "(leanfm methods lists them)")
    cfg.validate()
    return cfg


def tune(model: str, step: BaseConfig | dict, recipe: str | Recipe | None = None, out: str | Path = "runs/tune",
         protocol: Protocol | None = None, calib: Calibration | None = None, overwrite: bool = False,
         save: bool = True) -> dict:
    """Fine-tune ``model`` (after ``recipe``, when given) with ``step`` and measure it; returns
    the results dict (also written to ``out/results.json``)."""
    cfg = tune_config(step)
    protocol = dataclasses.replace(protocol or Protocol(), groups=GROUPS)
    protocol.validate()
    before = load_recipe(recipe) if recipe is not None else None
    name = before.name if before else "baseline"
    after = Recipe(name=f"{name}+{cfg.method}", seed=before.seed if before else 0,
                   steps=[*(before.steps if before else []), cfg],
                   description=f"{name}, then {cfg.method} fine-tuning")
    calib = calib or Calibration()
    if before is not None and any(s.needs_calibration for s in before.steps):
        calib.check()
    profile = load_profile()
    with OutputDir(out, overwrite) as out:
        torch.set_num_threads(protocol.threads)
        results = new_results(environment(protocol.threads, seed=after.seed), protocol.to_dict())
        results.update(model=model, hardware_profile=profile, kind="tune")
        for r in ([before] if before else []) + [after]:
            r.save(out / "recipes" / f"{r.name}.yaml")
        plan = [("baseline", Recipe(name="baseline"))] + ([("compressed", before)] if before else []) + [("tuned", after)]
        tok, ids = None, None
        kept = None  # the compressed model, tuned next instead of compressed a second time
        for i, (role, r) in enumerate(plan):
            run = {"id": i, "model": model, "recipe": r.to_dict(), "role": role, "status": "running"}
            results["runs"].append(run)
            progress.info(f"[{i + 1}/{len(plan)}] {r.name}")
            try:
                if kept is not None:
                    m, run["calibration"] = kept
                    kept = None
                else:
                    m, tok = load(model)
                    for s in r.steps:
                        s.check_model(m)
                    ids = eval_ids(tok, protocol) if ids is None else ids
                    compress_steps = [s for s in r.steps if s is not cfg]
                    if compress_steps:
                        cal_ids, run["calibration"] = Recipe(r.name, r.seed, compress_steps).calibration(calib, tok)
                        torch.manual_seed(r.seed)
                        for s in compress_steps:
                            apply_(m, s, calib=cal_ids)
                    cfg.check_model(m)
                if role == "tuned":
                    run["training"] = _train(m, cfg, profile)
                gc.collect()
                res = measure(m, tok, dataclasses.replace(protocol, groups=("memory",)), profile=profile, ids=ids)
                ref = load(model)[0] if i > 0 else None
                q = measure(m, tok, dataclasses.replace(protocol, groups=("quality",)), reference=ref, profile=profile, ids=ids)
                del ref
                res["metrics"].update(q["metrics"])
                res["details"].update(q["details"])
                if i == 0:
                    res["metrics"].update(top1_agreement=1.0, kl_to_baseline=0.0)
                if role == "tuned":
                    res["metrics"].update({k: v for k, v in run["training"].items() if k in _TRAIN_METRICS})
                    res["details"]["training"] = run.pop("training")
                    if save:
                        run["checkpoint"] = str(_save(m, tok, out, after))
                run.update(metrics=res["metrics"], details=res["details"], flags=q["flags"], status="ok")
                if role == "compressed":
                    kept = (m, run.get("calibration"))
            except (LeanfmError, RuntimeError, MemoryError) as e:
                run.update(status="error", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
                write(results, out)
                raise LeanfmError(f"{e} (runs so far saved in {out}/results.json)") from None
            finally:
                m = None
                gc.collect()
            write(results, out)
        base = results["runs"][0]
        for run in results["runs"][1:]:
            add_relative_metrics(run, base)
        _gap(results["runs"])
        write(results, out)
    return results


_TRAIN_METRICS = ("trainable_params", "peak_train_rss_bytes", "train_seconds", "train_tokens_per_s", "train_energy_j",
                  "energy_source", "predicted_peak_train_rss_bytes", "train_memory_prediction_error_pct")


def _train(model, cfg: BaseConfig, profile: dict) -> dict:
    """Apply the tuning step with its memory, time and energy measured around it alone."""
    from ..predict.arch import arch_from_config
    from ..predict.memory_plan import current_rss
    from ..predict.training import plan_training

    gc.collect()
    _page_in(model)
    plan = plan_training(arch_from_config(model.config.to_dict(), "model", "loaded"), cfg,
                         base=current_rss() - mem.weight_bytes(model))
    progress.info(plan.describe())
    meter = EnergyMeter(profile["power_w"])
    with mem.PeakRSS() as peak:
        meter.begin()
        t0 = time.perf_counter()
        apply_(model, cfg)
        seconds = time.perf_counter() - t0
        rec = model.leanfm_info["steps"][-1]["training"]
        meter.add(seconds, rec["train_tokens"])
    return {**rec, "peak_train_rss_bytes": peak.bytes, "peak_train_rss_scope": peak.scope,
            "predicted_peak_train_rss_bytes": plan.peak, "train_memory_prediction_error_pct": (plan.peak / peak.bytes - 1) * 100,
            "plan": {k: int(v) for k, v in plan.parts.items()},
            "train_seconds": round(seconds, 3), "train_energy_j": round(meter.joules, 3), "energy_source": meter.source}


def _page_in(model) -> None:
    """Touch one value per page of every weight. A freshly loaded checkpoint is memory-mapped and
    reaches the resident set only as it is read, so the process's size before training would
    otherwise leave out weights the first step brings in."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel() and t.device.type == "cpu":
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def _gap(runs: list[dict]) -> None:
    """``ppl_gap_recovered`` = (ppl compressed − ppl tuned) / (ppl compressed − ppl baseline)."""
    by = {r.get("role"): r for r in runs if r.get("status") == "ok"}
    if {"baseline", "compressed", "tuned"} <= by.keys():
        b, c, t = (by[k]["metrics"].get("perplexity") for k in ("baseline", "compressed", "tuned"))
        if None not in (b, c, t) and c > b:
            by["tuned"]["metrics"]["ppl_gap_recovered"] = (c - t) / (c - b)


def _save(model, tok, out: Path, recipe: Recipe) -> Path:
    from ..models.checkpoint import save_checkpoint

    return save_checkpoint(model, out / "checkpoint", tok, "leanfm", source=f"recipe {recipe.name}", overwrite=True,
                           extra_files={"recipe.yaml": recipe.to_yaml()})
