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

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import progress
from ...config import BaseConfig, register
from ...errors import LeanfmError
from ...models.family import decoder_config
from ..layers import LayerwiseRunner, decoder_layers
from .common import check_calibration, check_fraction, n_params, round_half_up


@dataclass
class LayerDropConfig(BaseConfig):
    """Drop whole decoder layers, the least influential first (ShortGPT block influence).

    Give exactly one of
    fraction: share of the decoder layers to drop, in (0, 1); the count is rounded half up
        (25% of SmolLM2's 30 layers drops 8; at least one layer is dropped);
    count: number of layers to drop (>= 1, fewer than the model has).
    """

    method = "layerdrop"
    needs_calibration = True
    fraction: float | None = None
    count: int | None = None

    def validate(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise LeanfmError("layerdrop needs exactly one of 'fraction' (e.g. 0.25) or 'count' (e.g. 4)")
        if self.fraction is not None:
            check_fraction("fraction", self.fraction)
        if self.count is not None and self.count < 1:
            raise LeanfmError(f"count={self.count} must be >= 1")

    def n_drop(self, n_layers: int) -> int:
        if self.count is not None:
            return self.count
        return max(1, round_half_up(self.fraction * n_layers))

    def check_model(self, model: nn.Module) -> None:
        n = len(decoder_layers(model))
        if self.n_drop(n) >= n:
            raise LeanfmError(f"layerdrop would drop {self.n_drop(n)} of the model's {n} decoder layers; keep at least one")


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
    """BI of every decoder layer on the calibration tokens, unmodified model, one layer at a time."""
    runner = LayerwiseRunner(model, calib)
    bi = []
    with progress.bar("layerdrop (block influence)", len(runner.layers)) as adv:
        for i in range(len(runner.layers)):
            out = runner.run_layer(i)
            bi.append(block_influence(runner.hidden, out))
            runner.hidden = out
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
    for new_idx, layer in enumerate(layers):  # the KV cache is indexed by each attention's layer_idx
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx


@register(LayerDropConfig)
def apply_layerdrop(model: nn.Module, cfg: LayerDropConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, "layerdrop")
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
