"""``leanfm predict`` for the families that are not causal LMs (issue 19): a ViT's or an image-text
model's latency per image (``predict/vit.py``), a diffusion denoiser's time per step and sample
(``predict/unet.py``) and a diffusers pipeline's (``predict/pipeline.py``: its modules' operators
traced on fake tensors), on any hardware profile, before running anything.

The recipe is checked against the family like ``leanfm bench`` does. A ViT recipe is priced from
its token-reducing step (ToMe, EViT; the other steps leave the FLOPs and the fp32 GEMMs of an
image as they are, and are named as not priced); a denoiser recipe's steps are applied to the graph (they change the step
count, the cache interval or the graph) and the result priced.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LeanfmError


def _folder(model: str) -> str:
    """The model's folder: its own, or an alias's cache (built on first use)."""
    from ..models.cache import build_cache
    from ..models.registry import ALIASES

    if model not in ALIASES:
        return str(Path(model).expanduser())
    spec = ALIASES[model]
    spec.require_installed()
    return str(build_cache(spec))


def _recipe_steps(recipe: str, family: str):
    from ..config import check_family
    from ..recipe import load_recipe

    r = load_recipe(recipe)
    for step in r.steps:
        step.validate()
        check_family(step, family)
    return r


def predict_family(model: str, family: str, recipe: str, hw: dict, batch: int, image_size: int, steps: int) -> dict:
    """The prediction dict of a ``vit``/``clip`` or ``diffusion`` model (see the module doc)."""
    r = _recipe_steps(recipe, family)
    path = _folder(model)
    if family in ("vit", "clip"):
        from ..models.family import vision_config
        from .vit import one_token_schedule, predict_vit

        out = predict_vit(vision_config(path), hw, batch, image_size, schedule=one_token_schedule(r.steps))
        out["not_priced"] = [s.method for s in r.steps if not hasattr(s, "token_schedule")]
        return {"family": family, "model": model, "recipe": r.name, **out}
    if family == "diffusion":
        from ..config import lookup
        from ..models.denoiser import load_denoiser
        from .unet import predict_denoiser

        den = load_denoiser(path)
        for step in r.steps:
            lookup(step.method)[1](den, step, None)
        out = predict_denoiser(den, hw, batch, steps)
        return {"family": family, "model": model, "recipe": r.name, "steps": den.steps or steps, **out}
    if family == "diffusion-pipeline":
        from ..config import lookup
        from ..models.pipeline import load_pipeline
        from .pipeline import predict_pipeline

        pipe = load_pipeline(path)
        for step in r.steps:  # through their own handlers: they change the modules the trace reads
            lookup(step.method)[1](pipe, step, None)
        out = predict_pipeline(pipe, hw, batch, steps)
        return {"family": family, "model": model, "recipe": r.name, "steps": pipe.steps or steps, **out}
    raise LeanfmError(f"leanfm predict does not price {family} models")


def render_family(p: dict) -> str:
    hw = p.get("hardware")
    if p["family"] == "diffusion-pipeline":
        extra = f", DeepCache shallow pass {p['shallow_ms_per_pass']:.4g} ms" if p.get("shallow_ms_per_pass") else ""
        return "\n".join([
            f"{p['model']} · {p['recipe']} on {hw} (diffusers pipeline, batch {p['batch']}, {p['steps']} step(s) per sample, "
            f"UNet on {p['guidance_batch']} latent(s) per sample)",
            f"  {p['ms_per_sample']:.4g} ms per sample, {p['ms_per_step']:.4g} ms per step ({p['bound']}-bound); UNet pass "
            f"{p['unet_ms_per_pass']:.4g} ms{extra}; text encoder and VAE {p['text_and_vae_ms_per_sample']:.4g} ms",
            f"  {p['flops_per_step'] / 1e9:.2f} GFLOP and {p['bytes_per_step'] / 1e9:.2f} GB moved per UNet pass and sample "
            f"({p['operators_per_pass']} operators traced on fake tensors)",
        ])
    if p["family"] == "diffusion":
        extra = f", DeepCache shallow pass {p['shallow_ms_per_pass']:.3g} ms" if p.get("shallow_ms_per_pass") else ""
        return "\n".join([
            f"{p['model']} · {p['recipe']} on {hw} (diffusion denoiser, batch {p['batch']}, {p['steps']} step(s) per sample)",
            f"  {p['ms_per_step']:.3g} ms per step and sample, {p['ms_per_sample']:.3g} ms per sample ({p['bound']}-bound); "
            f"full pass {p['full_ms_per_pass']:.3g} ms{extra}",
            f"  {p['flops_per_step'] / 1e9:.2f} GFLOP and {p['bytes_per_step'] / 1e9:.2f} GB moved per step and sample "
            f"({p['nodes']} ONNX nodes, {p['nodes_unshaped']} without inferred shapes: not counted)",
        ])
    lines = [f"{p['model']} · {p['recipe']} on {hw} ({p['family']}, batch {p['batch']}, tokens per block "
             f"{p['tokens_per_block'][0]}→{p['tokens_per_block'][-1]})",
             f"  {p['ms_per_image']:.3g} ms per image, {1e3 / p['ms_per_image']:,.1f} images/s; "
             f"{p['flops_per_image'] / 1e9:.2f} GFLOP per image (the image tower)"]
    if p.get("not_priced"):
        lines.append(f"  not priced: {', '.join(p['not_priced'])} (same FLOPs; the ViT roofline prices token reduction only)")
    return "\n".join(lines)
