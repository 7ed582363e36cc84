"""Model families and their quirks, kept in one place. Everything else walks modules generically.

A family says what a model is measured by: its quality protocol and the unit its speed is
reported in (issue 19). Each method declares the families it applies to
(``BaseConfig.families``); ``leanfm.apply_`` refuses the others in one line naming the family and
the methods that do apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at run time: the predictor reads families from configs alone
    from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    quality: str  # the quality protocol
    speed: str  # the unit speed is reported in


FAMILIES = {f.name: f for f in [
    Family("causal-lm", "causal language", "perplexity on WikiText-2 windows (and task accuracy where asked)",
           "tokens/s (prefill and decode), ms per token"),
    Family("vit", "vision transformer", "k-NN and linear-probe accuracy on a fixed, seeded Fashion-MNIST split; cosine of "
           "the features to the uncompressed model's", "images/s, ms per image"),
    Family("clip", "image-text dual encoder", "zero-shot classification accuracy", "images/s, ms per image"),
    Family("diffusion", "diffusion denoiser", "PSNR and SSIM of the outputs against the uncompressed model's on the same "
           "seeds and conditions", "seconds per sample, ms per denoising step"),
    Family("diffusion-pipeline", "diffusers pipeline", "PSNR and SSIM of the images against the uncompressed pipeline's on "
           "the same seeds and prompts", "seconds per sample, ms per denoising step"),
]}
# transformers model_type -> family, for the families that are not causal LMs
_MODEL_TYPES = {"dinov2": "vit", "vit": "vit", "deit": "vit", "clip": "clip", "siglip": "clip",
               "leanfm-dual-encoder": "clip", "leanfm-onnx-denoiser": "diffusion",
               "diffusers-pipeline": "diffusion-pipeline"}


def family_of(model: nn.Module) -> str:
    """The family of ``model``: what it was loaded as (``leanfm_info["family"]``), else what its
    config's ``model_type`` or its class says; anything else counts as a causal LM."""
    fam = getattr(model, "leanfm_info", {}).get("family") if isinstance(getattr(model, "leanfm_info", None), dict) else None
    if fam:
        return fam
    cfg = getattr(model, "config", None)
    mt = str(getattr(cfg, "model_type", "") or "")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    if type(model).__name__.endswith("Pipeline"):
        return "diffusion-pipeline"
    if "UNet" in type(model).__name__:
        return "diffusion"
    return "causal-lm"


def family_of_config(config: dict) -> str:
    """The family a ``config.json`` (as a dict) describes."""
    return _MODEL_TYPES.get(str(config.get("model_type", "")), "causal-lm")


def family_of_name(name: str) -> str:
    """The family of the model a ``--model`` argument names, from its config alone: an alias's
    declared family (without building its cache), else a folder's ``config.json``; anything else
    counts as a causal LM (the loader names any problem)."""
    from .registry import ALIASES

    if name in ALIASES:
        return ALIASES[name].family
    if (Path(name).expanduser() / "model_index.json").is_file():  # a diffusers pipeline folder
        return "diffusion-pipeline"
    cfg = Path(name).expanduser() / "config.json"
    try:
        return family_of_config(json.loads(cfg.read_text())) if cfg.is_file() else "causal-lm"
    except (OSError, ValueError):
        return "causal-lm"


def vision_config(path: str | Path) -> dict:
    """The image tower's config (dict) of the model folder ``path``: a ViT's own, a ``CLIPModel``'s
    ``vision_config``, a leanfm dual encoder's ``vision_model/config.json``."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if isinstance(cfg.get("vision_config"), dict):
        return cfg["vision_config"]
    tower = Path(path) / "vision_model" / "config.json"
    return json.loads(tower.read_text()) if tower.is_file() else cfg

# Families whose perplexity must be measured with BOS at the start of every window: Gemma was
# trained with BOS always present (GUIDE section 5: ppl 24 with BOS vs 61 without).
_BOS_FAMILIES = ("gemma",)


def needs_bos(model: nn.Module) -> bool:
    mt = str(getattr(model.config, "model_type", ""))
    return mt.startswith(_BOS_FAMILIES)


def max_context(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def decoder_config(model: nn.Module):
    """The text config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
