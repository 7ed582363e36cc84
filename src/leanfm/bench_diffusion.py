"""``leanfm bench`` on a diffusion denoiser (family ``diffusion``, e.g. ``terrain-cm``): speed per
sample and per denoising step, and fidelity to the first recipe's samples (the baseline) on the
same seeds, into the same results schema as the language models (issue 19).

Protocol (``models/family.py``, ``diffusion``): ``samples`` samples, seeds 0..N-1, each with its
own noise at every step and its condition the seed's turn in the model's list; multistep
consistency sampling with ``steps`` denoising steps unless a recipe's ``sampling-steps`` sets its
own. Every recipe's model runs in ONNX Runtime on the CPU with ``threads`` intra-op threads.
Quality against the first recipe's samples of the same seeds: PSNR and SSIM (data range: the
baseline set's max - min) averaged over samples, and the Wasserstein-1 distance between the two
sets' pooled values. Speed: batches of up to 8 seeds; one warm-up batch per recipe, then every
batch through every recipe in turn (A B C, A B C ...), ms per sample from the median batch.
Beside it, the roofline's time per step (``predict/unet.py``) for the model as its recipe left it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from . import progress
from .api import apply_, load
from .config import check_family
from .errors import LeanfmError
from .measure.image_quality import psnr, ssim, value_w1
from .measure.protocol import Protocol
from .measure.run import _json_safe
from .methods.diffusion.decl import sampler_steps
from .methods.diffusion.run import denoiser, sample, steps_of
from .recipe import Recipe
from .results import add_relative_metrics, start_results, write

BATCH = 8


def check_diffusion(recipes: list[Recipe], protocol: Protocol) -> None:
    """One-line refusals before any work: a step of another family, DeepCache with fewer than 2
    sampling steps (nothing to reuse)."""
    for r in recipes:
        try:
            for step in r.steps:
                check_family(step, "diffusion")
            sampler_steps(r.steps, protocol.steps)
        except LeanfmError as e:
            raise LeanfmError(f"recipe {r.name}: {e}") from None


def bench_diffusion(model_name: str, recipes: list[Recipe], protocol: Protocol, out: Path, profile: dict) -> dict:
    check_diffusion(recipes, protocol)
    results = start_results(model_name, recipes, protocol, profile, out, "onnxruntime")
    runs, models = [], []
    for i, r in enumerate(recipes):
        model, _ = load(model_name)
        t0 = time.perf_counter()
        apply_(model, r)
        runs.append({"id": i, "model": model_name, "recipe": r.to_dict(), "status": "ok", "calibration": None,
                     "apply_seconds": round(time.perf_counter() - t0, 3), "family": "diffusion",
                     "metrics": {"weight_bytes": model.weight_bytes(), "model_size_on_disk_bytes": model.file_bytes()},
                     "details": {"protocol": "diffusion", "steps": _json_safe(model.leanfm_info["steps"]),
                                 "sampling_steps": steps_of(model, protocol.steps)},
                     "flags": _flags(model)})
        models.append(model)
    outs, secs = _sample_all(models, protocol)
    ref = outs[0]
    rng = float(ref.max() - ref.min())
    for run, model, x, s in zip(runs, models, outs, secs):
        m, n_steps = run["metrics"], run["details"]["sampling_steps"]
        if "quality" in protocol.groups:
            if x is not ref:  # against itself PSNR is infinite, which JSON cannot hold: the baseline has none
                m["psnr_db"] = statistics.mean(psnr(x[i], ref[i], rng) for i in range(len(x)))
            m["ssim"] = statistics.mean(ssim(x[i, 0], ref[i, 0], rng) for i in range(len(x)))
            m["value_w1"] = value_w1(x, ref)
            run["details"]["data_range"] = rng
        batch = run["details"]["batch"] = min(BATCH, protocol.samples)
        med = statistics.median(s)
        m["ms_per_sample"] = 1e3 * med / batch
        m["samples_per_s"] = batch / med
        m["ms_per_step"] = m["ms_per_sample"] / n_steps
        run["details"].update({"ms_per_sample_min": 1e3 * min(s) / batch, "ms_per_sample_max": 1e3 * max(s) / batch,
                               "timed_batches": len(s)})
        pred = run["details"]["prediction"] = _prediction(model, protocol, batch)
        if pred.get("ms_per_step"):
            m["predicted_ms_per_step"] = pred["ms_per_step"]
            m["ms_per_step_prediction_error_pct"] = (pred["ms_per_step"] / m["ms_per_step"] - 1.0) * 100.0
    for run in runs:
        add_relative_metrics(run, runs[0])
    results["runs"] = runs
    write(results, out)
    return results


def _prediction(model, protocol: Protocol, batch: int) -> dict:
    """The roofline's time per step and sample (``predict/unet.py``, ``local`` with this thread
    count's calibration), or ``{"error": ...}`` where it does not price the model."""
    from .predict.hardware import predict_on_local
    from .predict.unet import predict_denoiser

    return predict_on_local(protocol.threads, lambda hw: predict_denoiser(model, hw, batch, protocol.steps))


def _flags(model) -> dict:
    """``simulated`` and every step's ``kernel`` (a recipe's steps compose: int8 graph + DeepCache)."""
    steps = model.leanfm_info["steps"]
    kernels = [s["kernel"] for s in steps if s.get("kernel")]
    return {"simulated": any(s.get("simulated") for s in steps),
            "kernel": " + ".join(kernels) if kernels else "ONNX Runtime CPU: the fp32 graph"}


def _sample_all(models: list, protocol: Protocol) -> tuple[list[np.ndarray], list[list[float]]]:
    """Every model's samples of seeds 0..N-1 and its batch times, batches interleaved over the models."""
    seeds = list(range(protocol.samples))
    batches = [seeds[i:i + BATCH] for i in range(0, len(seeds), BATCH)]
    dens = [denoiser(m, protocol.threads) for m in models]
    c = models[0].config
    outs = [np.zeros((len(seeds), c.channels, c.size, c.size), np.float32) for _ in models]
    secs: list[list[float]] = [[] for _ in models]
    with progress.bar(f"sampling: {len(batches)} batches of up to {BATCH} seeds over {len(models)} recipes (+1 warm-up)",
                      (len(batches) + 1) * len(models)) as adv:
        for m, d in zip(models, dens):  # warm-up: the first run of a session allocates and plans
            sample(m, batches[0], protocol.steps, d)
            adv()
        for idx in batches:
            for j, (m, d) in enumerate(zip(models, dens)):
                t0 = time.perf_counter()
                outs[j][idx] = sample(m, idx, protocol.steps, d)
                secs[j].append(time.perf_counter() - t0)
                adv()
    return outs, secs
