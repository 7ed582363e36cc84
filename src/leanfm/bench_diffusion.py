"""``leanfm bench`` on a diffusion model: an ONNX denoiser (family ``diffusion``, e.g. ``terrain-cm``)
or a diffusers pipeline (family ``diffusion-pipeline``): speed per sample and per denoising step,
and fidelity to the first recipe's samples (the baseline) on the same seeds, into the same
results schema as the language models (issue 19).

Protocol (``models/family.py``): ``samples`` samples, seeds 0..N-1, each with its own noise and
its condition the seed's turn in the model's list (a pipeline: ``models/pipeline.PROMPTS``);
``steps`` denoising steps unless a recipe's ``sampling-steps`` sets its own. An ONNX denoiser
samples by multistep consistency sampling in ONNX Runtime on the CPU with ``threads`` intra-op
threads; a pipeline by its own ``__call__`` and scheduler in torch on the CPU with ``threads``
threads.
Quality against the first recipe's samples of the same seeds: PSNR and SSIM (data range: the
baseline set's max - min) averaged over samples, and the Wasserstein-1 distance between the two
sets' pooled values. Speed: batches of up to 8 seeds; one warm-up batch per recipe, then every
batch through every recipe in turn (A B C, A B C ...), ms per sample from the median batch.
Beside it, the roofline's time per step (``predict/unet.py``; a pipeline: ``predict/pipeline.py``)
for the model as its recipe left it.
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
from .methods.diffusion.run import denoiser, sample
from .recipe import Recipe
from .results import add_relative_metrics, start_results, write

BATCH = 8


def check_diffusion(recipes: list[Recipe], protocol: Protocol, family: str = "diffusion") -> None:
    """One-line refusals before any work: a step of another family, DeepCache with fewer than 2
    sampling steps (nothing to reuse)."""
    for r in recipes:
        try:
            for step in r.steps:
                check_family(step, family)
            sampler_steps(r.steps, protocol.steps)
        except LeanfmError as e:
            raise LeanfmError(f"recipe {r.name}: {e}") from None


def bench_diffusion(model_name: str, recipes: list[Recipe], protocol: Protocol, out: Path, profile: dict,
                    family: str = "diffusion") -> dict:
    check_diffusion(recipes, protocol, family)
    torch_run = family == "diffusion-pipeline"
    results = start_results(model_name, recipes, protocol, profile, out, "torch" if torch_run else "onnxruntime",
                            dataset=f"noise seeds 0-{protocol.samples - 1}")
    if torch_run:
        import torch

        torch.set_num_threads(protocol.threads)
    runs, models = [], []
    for i, r in enumerate(recipes):
        model, _ = load(model_name)
        t0 = time.perf_counter()
        apply_(model, r)
        # the ONNX file as written; a pipeline's denoiser as held (every component in file_bytes)
        sizes = ({"weight_bytes": model.weight_bytes(), "pipeline_weight_bytes": model.file_bytes()} if torch_run else
                 {"weight_bytes": model.weight_bytes(), "model_size_on_disk_bytes": model.file_bytes()})
        runs.append({"id": i, "model": model_name, "recipe": r.to_dict(), "status": "ok", "calibration": None,
                     "apply_seconds": round(time.perf_counter() - t0, 3), "family": family, "metrics": sizes,
                     "details": {"protocol": family, "steps": _json_safe(model.leanfm_info["steps"]),
                                 "sampling_steps": model.steps or protocol.steps},
                     "flags": _flags(model, torch_run)})
        models.append(model)
    outs, secs = _sample_all(models, protocol)
    ref = outs[0]
    rng = float(ref.max() - ref.min())
    for run, model, x, s in zip(runs, models, outs, secs):
        m, n_steps = run["metrics"], run["details"]["sampling_steps"]
        if "quality" in protocol.groups:
            if x is not ref:  # against itself PSNR is infinite, which JSON cannot hold: the baseline has none
                m["psnr_db"] = statistics.mean(psnr(x[i], ref[i], rng) for i in range(len(x)))
            m["ssim"] = statistics.mean(ssim(x[i], ref[i], rng) for i in range(len(x)))  # over channels too
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
        if "error" in pred:  # recorded, and said: never a silent gap in the table
            progress.info(f"no roofline prediction for {run['recipe']['name']}: {pred['error']}")
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
    from .models.pipeline import PipelineModel
    from .predict.hardware import predict_on_local

    if isinstance(model, PipelineModel):
        from .predict.pipeline import predict_pipeline as price
    else:
        from .predict.unet import predict_denoiser as price
    return predict_on_local(protocol.threads, lambda hw: price(model, hw, batch, protocol.steps))


def _flags(model, torch_run: bool = False) -> dict:
    """``simulated`` and every step's ``kernel`` (a recipe's steps compose: int8 graph + DeepCache)."""
    steps = model.leanfm_info["steps"]
    kernels = [s["kernel"] for s in steps if s.get("kernel")]
    plain = (f"torch CPU: the fp32 pipeline, {type(model.scheduler).__name__}" if torch_run else
             "ONNX Runtime CPU: the fp32 graph")
    return {"simulated": any(s.get("simulated") for s in steps), "kernel": " + ".join(kernels) if kernels else plain}


def _sampler(model, protocol: Protocol):
    """``seeds -> [len(seeds), C, H, W]`` samples of ``model`` as its recipe left it (ONNX Runtime
    sessions built once here; a pipeline samples by its own call)."""
    from .models.pipeline import PipelineModel

    if isinstance(model, PipelineModel):
        return lambda idx: model.generate(idx, protocol.steps)
    d = denoiser(model, protocol.threads)
    return lambda idx: sample(model, idx, protocol.steps, d)


def _sample_all(models: list, protocol: Protocol) -> tuple[list[np.ndarray], list[list[float]]]:
    """Every model's samples of seeds 0..N-1 and its batch times, batches interleaved over the models."""
    seeds = list(range(protocol.samples))
    batches = [seeds[i:i + BATCH] for i in range(0, len(seeds), BATCH)]
    samplers = [_sampler(m, protocol) for m in models]
    outs: list[list[np.ndarray]] = [[] for _ in models]
    secs: list[list[float]] = [[] for _ in models]
    with progress.bar(f"sampling: {len(batches)} batches of up to {BATCH} seeds over {len(models)} recipes (+1 warm-up)",
                      (len(batches) + 1) * len(models)) as adv:
        for f in samplers:  # warm-up: the first run of a session allocates and plans
            f(batches[0])
            adv()
        for idx in batches:
            for j, f in enumerate(samplers):
                t0 = time.perf_counter()
                outs[j].append(f(idx))
                secs[j].append(time.perf_counter() - t0)
                adv()
    return [np.concatenate(o) for o in outs], secs
