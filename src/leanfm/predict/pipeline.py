"""The roofline predictor for a diffusers pipeline (family ``diffusion-pipeline``): ms per sample
and per denoising step, as the pipeline's own call runs it, from a trace of its modules'
operators (``predict/torch_trace.py``) priced like an ONNX denoiser's nodes (``predict/unet.py``).

One sample of ``steps`` steps costs: the text encoder once (a text-conditioned pipeline), the
UNet ``steps`` times on ``guidance`` latents (2 where the call's default guidance scale is > 1:
classifier-free guidance batches the unconditional and the conditional latent), and the VAE
decode once (where there is a VAE). With DeepCache every ``interval``-th UNet pass is the full
one and the others the shallow pass, both traced with the stubs it installs; ToMe, packed
layers and the scheduler's own arithmetic (small next to the UNet: not traced) as the recipe left
them. Inputs: the latent at the UNet's ``sample_size``, the prompt at the tokenizer's padded
length (what the pipeline feeds), ``batch`` samples per call.
"""
from __future__ import annotations

import inspect

from ..errors import LeanfmError
from .torch_trace import trace_costs
from .unet import price_ops


def _guidance(pipe) -> int:
    p = inspect.signature(pipe.__call__).parameters
    g = p.get("guidance_scale")
    return 2 if "prompt" in p and g is not None and isinstance(g.default, (int, float)) and g.default > 1 else 1


def _size(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def predict_pipeline(model, hardware: dict, batch: int, steps: int) -> dict:
    """``ms_per_sample`` and ``ms_per_step`` of a ``PipelineModel`` as its methods left it."""
    import torch

    pipe, unet = model.pipe, model.unet
    n = model.steps or steps
    g = _guidance(pipe)
    cfg = unet.config
    h, w = _size(cfg.sample_size)
    rows = batch * g
    text = getattr(pipe, "text_encoder", None)
    tok = getattr(pipe, "tokenizer", None)
    cross = getattr(cfg, "cross_attention_dim", None)
    seq = None
    if cross is not None:
        if text is None or tok is None:
            raise LeanfmError(f"{type(pipe).__name__}: a cross-attention UNet without a text encoder and tokenizer is not priced")
        seq = min(int(tok.model_max_length), int(getattr(text.config, "max_position_embeddings", 77)))

    def unet_call():
        kw = {"encoder_hidden_states": torch.zeros(rows, seq, int(cross))} if cross is not None else {}
        unet(torch.zeros(rows, int(cfg.in_channels), h, w), torch.tensor(999), **kw)

    calls = [unet_call]
    cache = getattr(unet, "leanfm_deepcache", None)
    if cache is not None:
        calls.append(unet_call)  # the second call of a fresh cache is a shallow pass
    if seq is not None:
        calls.append(lambda: text(torch.zeros(rows, seq, dtype=torch.long)))
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        calls.append(lambda: vae.decode(torch.zeros(batch, int(vae.config.latent_channels), h, w)))
    tome = getattr(unet, "leanfm_tome", None)
    saved = (cache.full_calls, cache.shallow_calls) if cache is not None else None
    if cache is not None:
        cache.reset()
    merged = tome.merged_calls if tome is not None else 0
    try:
        traced = trace_costs(*calls)
    finally:  # the trace leaves fake tensors and counts behind: the model samples as before
        if cache is not None:
            cache.reset()
            cache.full_calls, cache.shallow_calls = saved
        if tome is not None:
            tome.merged_calls = merged
            tome.reset()
    priced = [price_ops(c, hardware) for c in traced]
    full = priced[0]
    shallow = priced[1] if cache is not None else None
    n_full = len(range(0, n, cache.interval)) if cache is not None else n
    unet_ms = full["ms"] * n_full + (shallow["ms"] * (n - n_full) if shallow else 0.0)
    rest = priced[2 if cache is not None else 1:]
    per_batch = unet_ms + sum(p["ms"] for p in rest)
    return {"ms_per_sample": per_batch / batch, "ms_per_step": per_batch / batch / n,
            "unet_ms_per_pass": full["ms"] / batch, "shallow_ms_per_pass": shallow and shallow["ms"] / batch,
            "text_and_vae_ms_per_sample": sum(p["ms"] for p in rest) / batch,
            "flops_per_step": full["flops"] / batch, "bytes_per_step": full["bytes"] / batch, "bound": full["bound"],
            "operators_per_pass": full["nodes"], "guidance_batch": g, "batch": batch, "hardware": hardware.get("name")}
