"""Layer dropping by block influence (ShortGPT: Men et al., 2024, "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect", §3).

A layer whose output hidden state points the same way as its input changes little: its block
influence (paper eq. 1)

    BI_i = 1 - E_t[ x_{i,t} · x_{i+1,t} / (||x_{i,t}|| ||x_{i+1,t}||) ]

is small. BI is measured once on the unmodified model (one layer's inputs and outputs alive at a
time, :class:`~..layers.LayerwiseRunner`); the layers with the lowest BI are removed from the
decoder's ``nn.ModuleList``. The config shrinks with them (``num_hidden_layers`` and every
per-layer list such as Gemma3's ``layer_types``) and each remaining module's ``layer_idx`` is
renumbered so the KV cache indexes the right slot: ``save_pretrained`` gives a plain checkpoint
that ``AutoModelForCausalLM.from_pretrained`` reloads.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import progress
from ...errors import LeanfmError
from ...models.family import decoder_config
from ..layers import LayerwiseRunner, decoder_layers
from .common import check_calibration, n_params
from .decl import LayerDropConfig  # noqa: F401 (re-exported)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT eq. 1 for one layer: 1 - mean over tokens of cos(input, output) hidden states.

    ``x_in``, ``x_out``: ``[..., hidden]`` (every leading index is one token)."""
    if x_in.shape != x_out.shape:
        raise LeanfmError(f"block influence needs equal shapes, got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
    cos = F.cosine_similarity(x_in.reshape(-1, x_in.shape[-1]).double(), x_out.reshape(-1, x_out.shape[-1]).double(), dim=-1)
    return float(1.0 - cos.mean())


def lowest_influence(bi: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` layers with the lowest block influence, ascending (ties: earlier layer)."""
    if not 0 <= n < len(bi):
        raise LeanfmError(f"cannot drop {n} of {len(bi)} layers; keep at least one")
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    return sorted(order[:n])


@torch.no_grad()
def measure_block_influence(model: nn.Module, calib: torch.Tensor) -> list[float]:
    """BI of every decoder layer on the calibration tokens, unmodified model, one layer at a time
    (an onloaded layer is read for it and released after: nothing is written yet)."""
    runner = LayerwiseRunner(model, calib)
    bi = []
    with progress.bar("layerdrop (block influence)", len(runner.layers)) as adv:
        for i in range(len(runner.layers)):
            if runner.stream is not None:
                runner.stream.load_layer(i)
            out = runner.run_layer(i)
            n = runner.hidden.shape[0]  # samples have equal lengths: the mean over tokens is the mean of per-sample means
            bi.append(1.0 - sum(1.0 - block_influence(runner.hidden[s : s + 1], out[s : s + 1]) for s in range(n)) / n)
            old, runner.hidden = runner.hidden, out
            if hasattr(old, "close"):
                old.close()
            if runner.stream is not None:
                runner.stream.release_layer(i)
            adv()
    return bi


def remove_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Delete decoder layers ``drop`` in place and make config and ``layer_idx`` agree with the rest."""
    layers = decoder_layers(model)
    cfg = decoder_config(model)
    n_old = len(layers)
    drop = sorted(set(drop))
    if not drop or drop[0] < 0 or drop[-1] >= n_old or len(drop) >= n_old:
        raise LeanfmError(f"cannot drop layers {drop} of {n_old}")
    keep = [i for i in range(n_old) if i not in drop]
    # per-layer config lists (layer_types, sliding-window flags, ...): keep the surviving entries
    for key, value in list(vars(cfg).items()):
        if not key.startswith("_") and isinstance(value, (list, tuple)) and len(value) == n_old:
            setattr(cfg, key, type(value)(value[i] for i in keep))
    for i in reversed(drop):
        del layers[i]  # nn.ModuleList renumbers its keys: state_dict names stay contiguous
    cfg.num_hidden_layers = len(keep)
    stream = getattr(model, "leanfm_stream", None)
    if stream is not None:  # onloaded: layer j of the result is read from layer keep[j] of the source
        stream.renumber(keep)
    for new_idx, layer in enumerate(layers):  # the KV cache is indexed by each attention's layer_idx
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx


def apply_layerdrop(model: nn.Module, cfg: LayerDropConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    before = n_params(model)
    n_layers = len(decoder_layers(model))
    bi = measure_block_influence(model, calib)
    drop = lowest_influence(bi, cfg.n_drop(n_layers))
    remove_layers(model, drop)
    return {
        "simulated": False,
        "kernel": "dense fp32 (layers removed)",
        "dropped_layers": drop,
        "block_influence": [round(b, 6) for b in bi],
        "num_hidden_layers": [n_layers, n_layers - len(drop)],
        "params_before": before,
        "params_after": n_params(model),
        "calibration_tokens": int(calib.numel()),
    }
