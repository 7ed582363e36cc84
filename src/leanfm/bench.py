"""``leanfm bench``: for each recipe load fresh, apply, measure; baseline always first.

Two phases. **A**, recipe by recipe: load a fresh model, apply the recipe, measure memory (one
untimed decode under a peak-RSS probe) and quality (the unmodified reference loaded afterwards
for the fidelity metrics, so it never inflates ``peak_rss_bytes``); the model is then kept.
**B**, timing: the speed repeats of all kept models run interleaved, round by round (A B C, A B C,
...), so load from other processes hits every recipe alike; each repeat records how many cores
other processes kept busy. A speedup whose repeat range overlaps the baseline's, or measured
while other processes took cores the run needed, is flagged ``noisy`` (with the reason).

Keeping every model resident costs memory: ``peak_rss_bytes`` of a later recipe subtracts the
resident set the earlier kept models held when it started (``details.peak_rss_raw_bytes`` is the
reading itself), and a model that would not leave room for the next is timed at once, alone
(``details.speed_schedule``). ``interleave=False`` times each recipe alone right after phase A.
results.json is rewritten after every step, so an interrupted bench loses nothing.
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
from .measure import memory as mem
from .measure.cpuload import contention
from .measure.energy import EnergyMeter
from .measure.quality import make_windows
from .measure.run import check_seqlen, eval_ids, flags, measure, speed_prompt, timed_metrics
from .measure.runtime_run import RuntimeTimer, check_runtime_protocol, measure_untimed
from .measure.speed import DecodeTimer
from .models.device import describe as describe_device, place
from .models.family import family_of_name
from .models.load import load
from .outdir import OutputDir
from .predict.versus import compare, prediction_for_run
from .recipe import Recipe, load_recipe, recipe_file_stem
from .runtimes import check_recipes, check_runtime, export_for, open_session
from .results import add_relative_metrics, new_results, write


def order_recipes(names: list[str | Recipe]) -> list[Recipe]:
    """Parse every recipe up front (fail before any work) and put the baseline first."""
    recipes = [load_recipe(n) for n in names]
    base = [r for r in recipes if not r.steps]
    rest = [r for r in recipes if r.steps]
    return [base[0] if base else load_recipe("baseline")] + rest


def auto_calibration_size(job_tokens: int | None) -> tuple[int, int]:
    """Calibration ``(windows, tokens per window)`` scaled to the job: about as many tokens as
    are evaluated, at least 4096 and at most the GPTQ paper's 128 x 2048 (which a whole-split
    evaluation, ``job_tokens=None``, gets). Short windows (512) below that: calibration cost
    grows with its tokens, and for the layer statistics these methods collect (Hessians,
    activation norms) more windows matter more than longer ones."""
    full = 128 * 2048
    total = full if job_tokens is None else min(full, max(4096, job_tokens))
    seqlen = 2048 if total >= full else 512
    return total // seqlen, seqlen


def check_inputs(recipes: list[Recipe], calib: Calibration, protocol: Protocol | None = None) -> None:
    """Everything checkable without the model, before any work: the evaluation data and, when a
    recipe calibrates, the calibration source."""
    from .data.text import check_dataset

    if protocol is not None:
        check_dataset(protocol.dataset, protocol.split, protocol.data_dir)
    if any(s.needs_calibration for r in recipes for s in r.steps):
        calib.check()


def announce_calibration(recipes: list[Recipe], calib: Calibration) -> None:
    """Say what calibration the recipes will use and why (printed even without a terminal)."""
    users = [r.name for r in recipes if any(s.needs_calibration for s in r.steps)]
    if users:
        progress.info(f"calibration for {', '.join(users)}: {calib.n} windows x {calib.seqlen} tokens of {calib.dataset} "
                      f"({calib.sizing or 'as requested'}; --calib-samples/--calib-seqlen to change)")


def decode_check(model, ids: torch.Tensor, prompts: int = 3, length: int = 32, gen: int = 8) -> dict | None:
    """For a model with packed decode kernels: greedy tokens of the decode path checked against
    the dequantized reference path of the same weights on ``prompts`` slices of the evaluation
    text (:mod:`leanfm.measure.kernel_check`); raises when they disagree. None when nothing to check."""
    from .measure.kernel_check import check_decode_kernel, needs_decode_check

    if not needs_decode_check(model):
        return None
    length = min(length, max(2, ids.numel() // prompts))
    step = max(1, (ids.numel() - length) // prompts)
    starts = [i * step for i in range(prompts)]
    return check_decode_kernel(model, torch.stack([ids[s : s + length] for s in starts]), gen=gen)


def _file_kind(path: Path) -> str:
    """The tensor types in a runtime file, most frequent first (``Q4_0, F32, Q8_0``)."""
    if path.suffix != ".gguf":
        return "exported by leanfm"
    from collections import Counter

    import gguf

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(k for k, _ in counts.most_common())


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
    if not prev["runs"]:
        raise LeanfmError(f"cannot reuse the baseline in {path}: it holds no runs")
    run = dict(prev["runs"][0])
    if run.get("status") != "ok" or run["recipe"].get("steps"):
        raise LeanfmError(f"cannot reuse the baseline in {path}: its first run is not a successful baseline")
    run["reused_from"] = str(path)
    return run


def _rss() -> int:
    """Resident set of this process now (bytes; 0 where /proc is missing)."""
    return mem.proc_bytes("/proc/self/status", "VmRSS") or 0


def _noisy(run: dict, base: dict | None, threads: int) -> str | None:
    """Why this run's speed (or its speedup over the baseline) is not trustworthy, or None."""
    reasons = []
    d = run.get("details", {})
    why = contention(d.get("cpu_other_busy_cores_repeats") or [], threads)
    if why:
        reasons.append(why)
    if base is not None and base is not run:
        bd = base.get("details", {})
        why = contention(bd.get("cpu_other_busy_cores_repeats") or [], threads)
        if why:
            reasons.append(f"baseline: {why}")
        lo, hi = d.get("decode_tokens_per_s_min"), d.get("decode_tokens_per_s_max")
        blo, bhi = bd.get("decode_tokens_per_s_min"), bd.get("decode_tokens_per_s_max")
        if None not in (lo, hi, blo, bhi) and lo <= bhi and blo <= hi:
            reasons.append(f"decode tok/s range {lo:.2f}-{hi:.2f} overlaps the baseline's {blo:.2f}-{bhi:.2f}")
    return "; ".join(reasons) or None


class _Timed:
    """A kept model waiting for (or under) phase-B timing."""

    def __init__(self, run: dict, recipe: Recipe, model, prompt: torch.Tensor, protocol: Protocol, profile: dict, session=None):
        self.run, self.recipe, self.model, self.session = run, recipe, model, session
        self.meter = EnergyMeter(profile["power_w"])
        self.timer = (DecodeTimer(model, prompt, protocol.gen, self.meter, compile=protocol.compile) if session is None
                      else RuntimeTimer(session, prompt, protocol.gen, self.meter))

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def _time(entries: list[_Timed], protocol: Protocol) -> None:
    """``warmup`` rounds, then ``repeats`` recorded rounds, each running one repeat of every entry."""
    rounds = protocol.warmup + protocol.repeats
    label = f"speed, {len(entries)} recipes interleaved" if len(entries) > 1 else "speed"
    with progress.bar(label, rounds * len(entries)) as adv:
        for r in range(rounds):
            for e in entries:
                e.timer.repeat(record=r >= protocol.warmup)
                adv()


def _finish(entry: _Timed, protocol: Protocol, profile: dict, config: dict, schedule: str) -> None:
    """Speed/energy metrics, the prediction next to them, status ok."""
    run, recipe = entry.run, entry.recipe
    sp = entry.timer.result()
    session = entry.session
    m, d = timed_metrics(entry.model, sp, protocol, profile, entry.meter,
                         weight_bytes=session.decode_weight_bytes() if session is not None else None)
    run["metrics"].update(m)
    run["details"].update(d)
    run["details"]["speed_schedule"] = schedule
    entry.close()
    if session is not None and "speed" in protocol.groups:  # the roofline model knows leanfm's kernels, not the runtime's
        run["details"]["prediction"] = {"skipped": f"the predictor models leanfm's torch kernels, not {session.name}'s"}
    elif "speed" in protocol.groups:  # the roofline prediction next to the measurement (docs/predict.md)
        pred = prediction_for_run(config, recipe, protocol.batch, protocol.prompt, protocol.gen, protocol.threads)
        run["details"]["prediction"] = pred
        if "error" in pred:  # recorded, and said: never a silent gap in the table
            progress.info(f"no roofline prediction for {recipe.name}: {pred['error']}")
        run["metrics"].update(compare(pred, run["metrics"]))
    run["status"] = "ok"


def bench(model_name: str, recipe_names: list[str | Recipe], protocol: Protocol, out: str | Path,
          calib: Calibration | None = None, profile_path: str | None = None, reuse_baseline: str | Path | None = None,
          interleave: bool = True, overwrite: bool = False, baseline_is_reference: bool = True,
          runtime: str = "torch", gguf_type: str = "auto") -> dict:
    """Run every recipe on ``model_name`` under ``protocol``; the baseline first (measured, or
    copied from the results.json directory ``reuse_baseline`` when model and protocol match).
    ``interleave``: time all recipes' speed repeats round by round (see the module docstring).
    ``out`` must not already hold results unless ``overwrite`` (:mod:`leanfm.outdir`).
    ``baseline_is_reference=False`` (``leanfm eval``): the first run is not the reference of
    anything, so it gets no fidelity metrics (``top1_agreement``/``kl_to_baseline``).
    ``runtime``: ``torch`` (leanfm's own loop) or a runtime each recipe's model is exported to
    and measured in (:mod:`leanfm.runtimes`; the files go to ``<out>/files/``); ``gguf_type``:
    the GGUF type for ``llama.cpp`` (``auto``: the block type of the recipe's grid, f32 for a
    float model)."""
    protocol.validate()
    recipes = order_recipes(recipe_names)
    family = family_of_name(model_name)
    if family in ("vit", "clip"):
        if runtime != "torch" or protocol.compile or (protocol.device, protocol.dtype) != ("cpu", "fp32"):
            raise LeanfmError(f"a {family} model is measured on the torch runtime on the CPU in fp32; drop --runtime, "
                              "--compile, --device and --dtype")
        from .bench_vision import bench_vision

        with OutputDir(out, overwrite):
            return bench_vision(model_name, recipes, protocol, Path(out), load_profile(profile_path), family)
    if family == "diffusion":
        if runtime not in ("torch", "onnxruntime") or protocol.compile or (protocol.device, protocol.dtype) != ("cpu", "fp32"):
            raise LeanfmError("a diffusion model is measured in ONNX Runtime on the CPU; drop --runtime, --compile, --device "
                              "and --dtype")
        from .bench_diffusion import bench_diffusion

        with OutputDir(out, overwrite):
            return bench_diffusion(model_name, recipes, protocol, Path(out), load_profile(profile_path))
    if family == "diffusion-pipeline":
        if runtime != "torch" or protocol.compile or (protocol.device, protocol.dtype) != ("cpu", "fp32"):
            raise LeanfmError("a diffusers pipeline is measured in torch on the CPU in fp32; drop --runtime, --compile, "
                              "--device and --dtype")
        from .bench_diffusion import bench_diffusion

        with OutputDir(out, overwrite):
            return bench_diffusion(model_name, recipes, protocol, Path(out), load_profile(profile_path), family)
    if family != "causal-lm":
        raise LeanfmError(f"leanfm bench does not measure {family} models yet; it measures causal-lm, vit, clip and "
                          "diffusion models")
    check_runtime(runtime)
    check_recipes(runtime, recipes, gguf_type)
    if runtime != "torch":
        check_runtime_protocol(protocol, runtime)
        if (protocol.device, protocol.dtype) != ("cpu", "fp32"):
            raise LeanfmError(f"--device/--dtype choose where the torch runtime runs; --runtime {runtime} runs its own file "
                              "(drop --device/--dtype, or use --runtime torch)")
        if protocol.compile:
            raise LeanfmError(f"--compile compiles leanfm's torch decode step; --runtime {runtime} decodes in its own loop "
                              "(drop --compile, or use --runtime torch)")
    if (protocol.device, protocol.dtype) != ("cpu", "fp32"):  # before any work: packed layers are fp32-activation CPU kernels
        packing = [r.name for r in recipes for st in r.steps
                   if getattr(st, "produces", "") in ("int-weights", "int-embeddings") and getattr(st, "backend", "fake") != "fake"]
        if packing:
            what = "--device cuda" if protocol.device == "cuda" else f"--dtype {protocol.dtype}"
            raise LeanfmError(f"{what}: recipe {packing[0]} packs int weights for leanfm's CPU kernels, which choose their own "
                              "activation dtype; bench it with the defaults (--device cpu --dtype fp32), or on a GPU with --runtime vllm")
    profile = load_profile(profile_path)
    if calib is None:
        n, seqlen = auto_calibration_size(protocol.max_eval_tokens)
        calib = Calibration(n=n, seqlen=seqlen, sizing=f"scaled to max_eval_tokens={protocol.max_eval_tokens}")
    check_inputs(recipes, calib, protocol)
    with OutputDir(out, overwrite):
        return _bench(model_name, recipes, protocol, Path(out), calib, profile, reuse_baseline, interleave, baseline_is_reference,
                      runtime, gguf_type)


def _bench(model_name: str, recipes: list[Recipe], protocol: Protocol, out: Path, calib: Calibration, profile: dict,
           reuse_baseline, interleave: bool, baseline_is_reference: bool, runtime: str = "torch", gguf_type: str = "auto") -> dict:
    torch.set_num_threads(protocol.threads)
    results = new_results(environment(protocol.threads, seed=recipes[0].seed), protocol.to_dict())
    results["model"] = model_name
    results["hardware_profile"] = profile
    results["environment"]["speed_schedule"] = "interleaved" if interleave else "sequential"
    results["environment"]["runtime"] = runtime
    results["environment"]["torch_device"] = describe_device(protocol.device, protocol.dtype)
    for r in recipes:
        r.save(out / "recipes" / f"{recipe_file_stem(r.name)}.yaml")

    model, tok = load(model_name)
    config = model.config.to_dict()  # the architecture before any recipe changes it (for predictions)
    check_seqlen(model, protocol)
    for r in recipes:  # fail on an impossible recipe before measuring anything
        for step in r.steps:
            step.check_model(model)
    announce_calibration(recipes, calib)
    ids = eval_ids(tok, protocol)
    if "quality" in protocol.groups:  # a too-small --max-eval-tokens fails now, not after the speed runs
        make_windows(ids, protocol.seqlen, protocol.max_eval_tokens, None)
    timed = [g for g in protocol.groups if g in ("speed", "energy")]
    untimed = tuple(g for g in protocol.groups if g not in ("speed", "energy"))
    prompt = speed_prompt(ids, protocol)
    kept: list[_Timed] = []
    kept_rss_base = None  # RSS before the first kept model beyond the baseline process

    def fail(run: dict, recipe: Recipe, e: BaseException):
        run.update(status="error", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        results["environment"]["load_average_after"] = list(os.getloadavg())
        write(results, out)
        if _oom(e):
            raise LeanfmError(f"out of memory in recipe {recipe.name}; lower --batch/--seqlen or use a smaller model (runs so far saved in {out}/results.json)") from None
        if isinstance(e, LeanfmError):
            raise LeanfmError(f"{e} (runs so far saved in {out}/results.json)") from None
        raise e

    for i, recipe in enumerate(recipes):
        if i == 0 and reuse_baseline is not None:
            results["runs"].append({**_reused_baseline(reuse_baseline, model_name, protocol), "id": 0})
            write(results, out)
            del model
            gc.collect()
            continue
        run = {"id": i, "model": model_name, "recipe": recipe.to_dict(), "status": "running"}
        results["runs"].append(run)
        try:
            progress.info(f"[{i + 1}/{len(recipes)}] {recipe.name}")
            if i > 0:
                gc.collect()
                held = _rss() - kept_rss_base if kept and kept_rss_base is not None else 0
                model, _ = load(model_name)
            else:
                held = 0
            t0 = time.perf_counter()
            calib_ids, run["calibration"] = recipe.calibration(calib, tok)
            apply_(model, recipe, calib=calib_ids)
            run["apply_seconds"] = round(time.perf_counter() - t0, 3)
            session = None
            if runtime != "torch":  # export, then measure inside the runtime (leanfm's torch kernels do not run)
                check = None
                t0 = time.perf_counter()
                path = export_for(runtime, model, tok, out / "files" / recipe_file_stem(recipe.name), gguf_type)
                run["export_seconds"] = round(time.perf_counter() - t0, 3)
                session = open_session(runtime, path, protocol.threads, max(protocol.seqlen, protocol.prompt + protocol.gen + 1))
                run["runtime"] = session.info()
                # fidelity against leanfm's torch baseline; for the baseline itself that is the runtime's
                # faithfulness to torch on the same weights
                ref = (load(model_name)[0] if i > 0 else model) if "quality" in untimed and (i > 0 or baseline_is_reference) else None
                res = measure_untimed(session, model, tok, dataclasses.replace(protocol, groups=untimed), ids, reference=ref)
                del ref
                res["flags"] = {"simulated": False, "kernel": f"{runtime} ({path.suffix[1:]}: {_file_kind(path)})"}
            else:
                check = decode_check(model, ids)  # before any measurement: a wrong kernel gets no numbers
                place(model, protocol.device, protocol.dtype)  # methods ran on the CPU in fp32; measured where asked
                res = {"metrics": {}, "details": {}, "flags": {}}
            if session is None and "memory" in untimed:
                res = measure(model, tok, dataclasses.replace(protocol, groups=("memory",)), profile=profile, ids=ids)
                if held > 0:
                    res["details"]["peak_rss_raw_bytes"] = res["metrics"]["peak_rss_bytes"]
                    res["metrics"]["peak_rss_bytes"] -= held
                    res["details"]["peak_rss_scope"] += (f", minus {held} bytes resident in {len(kept)} other models "
                                                         "kept for interleaved timing")
            if session is None and "quality" in untimed:
                ref = place(load(model_name)[0], protocol.device, protocol.dtype) if i > 0 else None
                q = measure(model, tok, dataclasses.replace(protocol, groups=("quality",)), reference=ref, profile=profile, ids=ids)
                del ref
                res["metrics"].update(q["metrics"])
                res["details"].update(q["details"])
                res["flags"] = q["flags"]
                if i == 0 and baseline_is_reference:  # the baseline is the reference: identical by definition
                    res["metrics"].update(top1_agreement=1.0, kl_to_baseline=0.0)
            res["flags"] = res["flags"] or flags(model)
            if check is not None:
                res["details"]["decode_check"] = check
            run.update(metrics=res["metrics"], details=res["details"], flags=res["flags"],
                       status="timing" if timed else "ok")
            if session is not None and not timed:
                session.close()
            if timed:
                entry = _Timed(run, recipe, model, prompt, protocol, profile, session)
                room, size = mem.proc_bytes("/proc/meminfo", "MemAvailable"), mem.weight_bytes(model)
                if interleave and (room is None or room > 3 * size):
                    if not kept:
                        gc.collect()
                        kept_rss_base = _rss() - size
                    kept.append(entry)
                else:  # alone, now (no interleaving, or no room to keep it)
                    _time([entry], protocol)
                    _finish(entry, protocol, profile, config,
                            "sequential" if not interleave else "sequential (too little memory to keep it for interleaving)")
                    del entry
        except (LeanfmError, RuntimeError, MemoryError) as e:
            fail(run, recipe, e)
        write(results, out)
        del model
        gc.collect()
    if kept:
        entry = kept[0]
        try:
            _time(kept, protocol)
            for entry in kept:
                _finish(entry, protocol, profile, config,
                        f"interleaved with {len(kept) - 1} other recipes" if len(kept) > 1 else "sequential")
        except (LeanfmError, RuntimeError, MemoryError) as e:
            fail(entry.run, entry.recipe, e)
        kept.clear()
    base = results["runs"][0]
    for run in results["runs"]:
        if run.get("status") != "ok":
            continue
        if run is not base:
            add_relative_metrics(run, base)
        if timed:
            why = _noisy(run, base, protocol.threads)
            run["flags"]["noisy"] = why is not None
            if why:
                run["flags"]["noisy_reason"] = why
    results["environment"]["load_average_after"] = list(os.getloadavg())
    write(results, out)
    return results
