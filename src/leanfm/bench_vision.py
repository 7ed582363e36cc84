"""``leanfm bench`` on a vision transformer (family ``vit``, e.g. ``dinov2-s``): images/s and
ms per image, k-NN and linear-probe accuracy on Fashion-MNIST, and the features' cosine to the
baseline's, into the same results schema as the language models (issue 19).

Protocol (``models/family.py``, ``vit``): a fixed, class-balanced split of Fashion-MNIST drawn
with the recipe seed (``train_per_class`` training and ``test_per_class`` test images per
class, from the official train and test files), grey images resized to ``image_size`` and
ImageNet-normalised. Features: the class token of the final LayerNorm. Quality: weighted k-NN
(k 20, T 0.07, DINO's protocol) and a logistic-regression probe on those features; fidelity:
mean cosine of each test image's features to the first recipe's (the baseline). Speed: one
batch of ``batch`` test images (at least 8) through each recipe's model, interleaved over the
recipes round by round (one warm-up round, ``repeats`` recorded), images/s from the median.
The calibrated methods (GPTQ, Wanda, SparseGPT) calibrate on ``CALIB_PER_CLASS`` images per class
drawn from the train file with the recipe seed + 1000 (``data.images.calibration_images``).

On an image-text dual encoder (family ``clip``: ``lit-fmnist``, a ``CLIPModel`` folder) the
same run measures zero-shot accuracy instead (``measure/zero_shot.py``): the ``test_per_class``
test images against one text embedding per class, averaged over the model's evaluation prompt
templates (its own, else ``DEFAULT_TEMPLATES``) and recomputed for every recipe, so a compressed
text tower is measured too. Fidelity is the cosine of the image embeddings to the baseline's;
speed is the image tower with its projection (``get_image_features``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import progress
from .api import apply_, load
from .config import check_family
from .data.images import calibration_images, fixed_split, load_fashion_mnist, to_pixels
from .errors import LeanfmError
from .measure.memory import model_size_on_disk_bytes, weight_bytes
from .measure.protocol import Protocol
from .measure.run import _json_safe, flags
from .measure.vision import encode, fidelity, knn_accuracy, linear_probe_accuracy
from .measure.zero_shot import CLASS_WORDS, DEFAULT_TEMPLATES, class_embeddings, image_embeddings, zero_shot_accuracy
from .models.family import vision_config
from .models.load import resolve
from .recipe import Recipe
from .results import add_relative_metrics, start_results, write

SPEED_BATCH_MIN = 8
CALIB_PER_CLASS = 8  # calibration images per class for GPTQ/Wanda/SparseGPT on a ViT: 80 images, ~20k tokens at 224


def check_vision(path: str, recipes: list[Recipe], protocol: Protocol, family: str = "vit") -> dict:
    """One-line refusals before any work: an image size the patch does not divide, a step of
    another family, a ToMe step checked for another size than the protocol's. Returns the
    image tower's config (dict)."""
    cfg = vision_config(path)
    patch = int(cfg.get("patch_size", 1))
    size = protocol.image_size
    if size % patch:
        raise LeanfmError(f"--image-size {size} is not a multiple of the model's patch size {patch}; "
                          f"use {size // patch * patch or patch} or {(size // patch + 1) * patch}")
    for r in recipes:
        for step in r.steps:
            try:
                check_family(step, family)
            except LeanfmError as e:
                raise LeanfmError(f"recipe {r.name}: {e}") from None
            if hasattr(step, "token_schedule") and step.image_size != size:
                raise LeanfmError(f"recipe {r.name}: {step.method} is checked for {step.image_size}x{step.image_size} images but "
                                  f"--image-size is {size}; set the step's image_size to {size}")
    return cfg


def _data(protocol: Protocol, seed: int, train: bool = True):
    """Pixels and labels of the fixed split (the training part only when ``train``)."""
    xte, yte = load_fashion_mnist("test", protocol.data_dir)
    ite = fixed_split(yte, protocol.test_per_class, seed)
    pte = to_pixels(xte[ite], protocol.image_size)
    if not train:
        return pte[:0], yte[:0], pte, yte[ite]
    xtr, ytr = load_fashion_mnist("train", protocol.data_dir)
    itr = fixed_split(ytr, protocol.train_per_class, seed)
    return to_pixels(xtr[itr], protocol.image_size), ytr[itr], pte, yte[ite]


def _prompts(model) -> tuple[list[str], list[str]]:
    """The class words and evaluation templates of a dual encoder (its own, else the defaults)."""
    cfg = getattr(model, "config", None)
    classes = list(getattr(cfg, "classes", None) or CLASS_WORDS)
    return classes, list(getattr(cfg, "eval_templates", None) or DEFAULT_TEMPLATES)


def _zero_shot(model, tok, pte, yte, m: dict, details: dict, r: Recipe) -> torch.Tensor:
    if tok is None:
        raise LeanfmError("this image-text model has no tokenizer in its folder; copy its tokenizer files into it")
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    classes, templates = _prompts(model)
    with progress.bar(f"{r.name}: image embeddings of {pte.shape[0]} test images", pte.shape[0]) as adv:
        emb = image_embeddings(model, pte, advance=adv)
    m["zero_shot_accuracy"] = zero_shot_accuracy(emb, class_embeddings(model, tok, classes, templates), yte)
    details["zero_shot"] = {"classes": classes, "templates": templates, "test_images": int(pte.shape[0])}
    return emb


def bench_vision(model_name: str, recipes: list[Recipe], protocol: Protocol, out: Path, profile: dict,
                 family: str = "vit") -> dict:
    path, _ = resolve(model_name)
    config = check_vision(path, recipes, protocol, family)
    torch.set_num_threads(protocol.threads)
    seed = recipes[0].seed
    ptr, ytr, pte, yte = _data(protocol, seed, train=family == "vit")
    results = start_results(model_name, recipes, protocol, profile, out, "torch", dataset="fashion-mnist")
    first, tok = load(model_name)
    for r in recipes:  # every recipe fits the model before anything is measured
        for step in r.steps:
            try:
                step.check_model(first)
            except LeanfmError as e:
                raise LeanfmError(f"recipe {r.name}: {e}") from None
    runs, models, ref, calib = [], [], None, None
    for i, r in enumerate(recipes):
        model = first if i == 0 else load(model_name)[0]
        t0 = time.perf_counter()
        torch.manual_seed(r.seed)
        calibrated = any(getattr(s, "needs_calibration", False) for s in r.steps)
        if calibrated and calib is None:  # GPTQ, Wanda, SparseGPT on a ViT: images from the train file
            calib = calibration_images(CALIB_PER_CLASS, protocol.image_size, seed, protocol.data_dir)
        apply_(model, r, calib=calib if calibrated else None)
        run = {"id": i, "model": model_name, "recipe": r.to_dict(), "status": "ok",
               "calibration": {"dataset": "fashion-mnist train", "images": int(calib.shape[0]), "seed": seed + 1000,
                               "image_size": protocol.image_size} if calibrated else None,
               "apply_seconds": round(time.perf_counter() - t0, 3), "metrics": {}, "details": {"protocol": "vit"},
               "flags": flags(model), "family": family}
        m = run["metrics"]
        if "memory" in protocol.groups:
            m["weight_bytes"] = weight_bytes(model)
            m["model_size_on_disk_bytes"] = model_size_on_disk_bytes(model)
        if "quality" in protocol.groups and family == "clip":
            emb = _zero_shot(model, tok, pte, yte, m, run["details"], r)
            ref = emb if ref is None else ref
            m["feature_cosine"] = fidelity(emb, ref)
        elif "quality" in protocol.groups:
            with progress.bar(f"{r.name}: features of {ptr.shape[0] + pte.shape[0]} images", ptr.shape[0] + pte.shape[0]) as adv:
                ftr, fte = encode(model, ptr, advance=adv), encode(model, pte, advance=adv)
            ref = fte if ref is None else ref
            m["knn_accuracy"] = knn_accuracy(ftr, ytr, fte, yte)
            m["linear_probe_accuracy"] = linear_probe_accuracy(ftr, ytr, fte, yte, seed=seed)
            m["feature_cosine"] = fidelity(fte, ref)
            run["details"]["eval_images"] = {"train": int(ptr.shape[0]), "test": int(pte.shape[0])}
        run["details"]["steps"] = _json_safe(model.leanfm_info["steps"])
        runs.append(run)
        models.append(model)
    if "speed" in protocol.groups:
        _time(models, runs, pte, protocol, family)
        for r, run in zip(recipes, runs):
            run["details"]["prediction"] = _prediction(config, r, protocol, run["details"]["speed_batch"])
            pred = run["details"]["prediction"].get("ms_per_image")
            if pred:
                run["metrics"]["predicted_ms_per_image"] = pred
                run["metrics"]["ms_per_image_prediction_error_pct"] = (pred / run["metrics"]["ms_per_image"] - 1.0) * 100.0
    for run in runs:
        add_relative_metrics(run, runs[0])
    results["runs"] = runs
    write(results, out)
    return results


def _prediction(config: dict, recipe: Recipe, protocol: Protocol, batch: int) -> dict:
    """The roofline's latency per image for the recipe (``predict/vit.py``, ``local`` with this
    thread count's calibration), or ``{"error": ...}`` for a step it does not price."""
    from .predict.hardware import predict_on_local
    from .predict.vit import one_token_schedule, predict_vit

    other = [s.method for s in recipe.steps if not hasattr(s, "token_schedule")]
    if other:
        return {"error": f"the ViT predictor prices the plain model and token reduction (ToMe, EViT) only, not {other[0]}"}
    return predict_on_local(protocol.threads, lambda hw: predict_vit(config, hw, batch, protocol.image_size,
                                                                     schedule=one_token_schedule(recipe.steps)))


@torch.no_grad()
def _time(models: list, runs: list[dict], pixels: torch.Tensor, protocol: Protocol, family: str = "vit") -> None:
    batch = pixels[:max(protocol.batch, SPEED_BATCH_MIN)]
    secs: list[list[float]] = [[] for _ in models]
    rounds = protocol.warmup + protocol.repeats
    with progress.bar(f"speed: {rounds} rounds over {len(models)} recipes", rounds * len(models)) as adv:
        for rnd in range(rounds):  # A B C, A B C ...: drift hits every recipe alike
            for j, model in enumerate(models):
                t0 = time.perf_counter()
                model.get_image_features(pixel_values=batch) if family == "clip" else model(pixel_values=batch)
                if rnd >= protocol.warmup:
                    secs[j].append(time.perf_counter() - t0)
                adv()
    n = batch.shape[0]
    for run, s in zip(runs, secs):
        med = statistics.median(s)
        run["metrics"]["images_per_s"] = n / med
        run["metrics"]["ms_per_image"] = 1e3 * med / n
        run["details"].update({"images_per_s_min": n / max(s), "images_per_s_max": n / min(s), "speed_batch": n,
                               "images_per_s_repeats": [n / x for x in s]})
