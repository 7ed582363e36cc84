"""The roofline predictor for a vision transformer (issue 19): latency per image.

A ViT encoder block is a decoder block without the causal mask: q/k/v/o projections, a two-
matrix GELU MLP, biases everywhere, two LayerNorms. So an image is priced as the prefill of its
tokens (``1 + (size / patch)^2``, the class token and the patches) through the same roofline
(:func:`leanfm.predict.analyzer.predict`) on an equivalent decoder config with no vocabulary (a
ViT ends in its final LayerNorm; the one-row "head" left costs nothing). Two simplifications,
both small for ViT-S at 224: attention is priced causal (half the score FLOPs; the scores are
about 5% of a block's FLOPs at 257 tokens) and the patch embedding (one conv, about 3% of the
FLOPs) is left out.

With ToMe the blocks run on shrinking token counts ``n_0 > n_1 > ...``; the model's time is the
mean over blocks of the whole model's prefill time at ``n_i`` tokens (each block costs
``1/L`` of a model with ``L`` such blocks, and the per-model overhead is counted once).
"""
from __future__ import annotations

from ..errors import LeanfmError


def as_decoder(config: dict) -> dict:
    """The decoder-shaped config the roofline prices a ViT ``config.json`` (dict) with."""
    try:
        hidden, layers, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise LeanfmError("a vision transformer's config needs hidden_size, num_hidden_layers and num_attention_heads") from None
    inter = int(config.get("intermediate_size") or hidden * float(config.get("mlp_ratio", 4)))
    return {"model_type": f"{config.get('model_type', 'vit')}-encoder", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": inter, "vocab_size": 1, "gated_mlp": bool(config.get("use_swiglu_ffn")),
            "attention_bias": bool(config.get("qkv_bias", True)), "mlp_bias": True, "max_position_embeddings": 1 << 20}


def tokens_per_block(config: dict, image_size: int, r: int = 0, schedule=None) -> list[int]:
    """The tokens each block runs on: ``schedule(tokens, blocks)`` (a token-reducing step's
    ``token_schedule``), else ToMe's with ``r`` per block (0: every block on all tokens)."""
    patch = int(config.get("patch_size", 16))
    if image_size % patch:
        raise LeanfmError(f"image size {image_size} is not a multiple of the patch size {patch}")
    from ..methods.vision.decl import merge_schedule

    tokens, blocks = 1 + (image_size // patch) ** 2, int(config["num_hidden_layers"])
    return schedule(tokens, blocks) if schedule is not None else merge_schedule(tokens, blocks, r)


def one_token_schedule(steps):
    """The ``token_schedule`` of a recipe's one token-reducing step (ToMe, EViT; None: the plain
    model). The roofline prices one such step: two would compose their schedules, which it does not model."""
    reducers = [s for s in steps if hasattr(s, "token_schedule")]
    if len(reducers) > 1:
        raise LeanfmError(f"the ViT predictor prices one token-reducing step, not {len(reducers)}")
    return reducers[0].token_schedule if reducers else None


def predict_vit(config: dict, hardware, batch: int, image_size: int, r: int = 0, schedule=None) -> dict:
    """``ms_per_image`` (and ``flops_per_image``, ``tokens_per_block``) for ``batch`` images of
    ``image_size`` pixels through the ViT ``config`` on ``hardware`` (a name or a profile dict),
    merging ``r`` tokens per block (ToMe; 0 = none), or with the tokens per block a
    token-reducing step's ``schedule(tokens, blocks)`` gives."""
    from .analyzer import predict

    dec = as_decoder(config)
    tokens = tokens_per_block(config, image_size, r, schedule)
    runs = {n: predict(dec, "baseline", hardware, batch=batch, prompt=n, gen=1) for n in sorted(set(tokens))}
    ms = sum(runs[n]["prefill_ms"] for n in tokens) / len(tokens)
    flops = sum(runs[n]["prefill_flops"] for n in tokens) / len(tokens)
    return {"ms_per_image": ms / batch, "flops_per_image": flops / batch, "tokens_per_block": tokens, "batch": batch,
            "bound": runs[tokens[0]]["bound"], "hardware": runs[tokens[0]]["hardware"]}
