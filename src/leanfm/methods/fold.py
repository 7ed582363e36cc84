"""Folding a per-channel scale into the op that produces a linear layer's input.

AWQ and SmoothQuant both rewrite ``y = W x`` as ``y = (W diag(s)) (x / s)`` and fold ``1 / s``
into whatever produced ``x``. Instead of a table of model families, :func:`find_producer` tries
each candidate in the decoder layer (norms, then linears with a matching output width) and keeps
the one for which scaling its output channels by ``1 / r`` scales the observed input by exactly
``1 / r``: this covers Llama-style ``x * w`` norms, Gemma's ``x * (1 + w)`` norms, ``v -> o``
without GQA and ``up -> down`` (the MLP's input is ``act(gate) * up``, linear in ``up``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NORM_MODES = ("mul", "one_plus")


def _norm_weight(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(mod, nn.Linear) else None


def divide_output(mod: nn.Module, s: torch.Tensor, mode: str = "mul") -> None:
    """Scale ``mod``'s output channels by ``1 / s`` in place."""
    with torch.no_grad():
        if isinstance(mod, nn.Linear):
            mod.weight.div_(s.unsqueeze(1))
            if mod.bias is not None:
                mod.bias.div_(s)
        elif mode == "mul":
            mod.weight.div_(s)
        else:  # y = x_hat * (1 + w)  ->  1 + w' = (1 + w) / s
            mod.weight.copy_((1 + mod.weight) / s - 1)


def _snapshot(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


def find_producer(
    layer: nn.Module, consumers: list[nn.Linear], observe: Callable[[], torch.Tensor]
) -> tuple[nn.Module, str] | None:
    """The module (and norm mode) whose output channels feed ``consumers`` linearly, or None.

    ``observe()`` runs the layer on a fixed sample and returns the consumers' input ``[T, in]``.
    """
    k = consumers[0].in_features
    base = observe()
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(k, generator=gen) * 1.5 + 0.5
    cands: list[tuple[nn.Module, str]] = []
    for mod in layer.modules():
        w = _norm_weight(mod)
        if w is not None and w.numel() == k:
            cands += [(mod, m) for m in NORM_MODES]
    cands += [(m, "mul") for m in layer.modules() if isinstance(m, nn.Linear) and m.out_features == k and all(m is not c for c in consumers)]
    for mod, mode in cands:
        snap = _snapshot(mod)
        divide_output(mod, r, mode)
        got = observe()
        mod.load_state_dict(snap)
        if torch.allclose(got * r, base, rtol=1e-3, atol=1e-4 * float(base.abs().max())):
            return mod, mode
    return None
