"""Low-rank factorization techniques ``svd`` and ``asvd``: model glue (configs in :mod:`.decl`).

Each target ``nn.Linear`` (all but ``skip``; only ``only`` when given) is replaced by a
:class:`~leanfm.kernels.lowrank.LowRankLinear` when its rank r saves parameters
(r (in + out) < in x out); layers where it would not are left dense and listed under
``skipped_layers``.

``asvd`` collects each layer's input statistics on calibration tokens, layer by layer with
:class:`~..layers.LayerwiseRunner` (each layer sees the outputs of the already-factorized layers
before it), and by default whitens with the Cholesky factor of X^T X as SVD-LLM does
(``scaling: whiten``): that truncation minimizes the layer's output error on the calibration
inputs exactly (Eckart–Young on W S), where ASVD's diagonal activation scaling
(``scaling: diag``, Yuan et al. 2023) is a heuristic for it. The method keeps the name "asvd"
("activation-aware SVD") for both. Linears outside the decoder layers (e.g. an unskipped
lm_head) get no calibration inputs and fall back to plain SVD (``plain_svd_layers``).
"""
from __future__ import annotations

import torch
from torch import nn

from ...kernels.lowrank import LowRankLinear
from ...kernels.modules import set_module
from ..layers import LayerwiseRunner, targets_in
from ..structured.common import check_calibration, n_params
from .decl import SCALINGS, ASVDConfig, SVDConfig  # noqa: F401 (re-exported)
from .svd_math import ActStats, scaled_svd, truncated_svd, whitened_svd

def _replace(model: nn.Module, name: str, lin: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    bias = None if lin.bias is None else lin.bias.detach()
    set_module(model, name, LowRankLinear.from_factors(a, b, bias))


def _summary(model: nn.Module, ranks: dict[str, int], done: list[str], before: int, extra: dict) -> dict:
    skipped = [n for n in ranks if n not in done]
    return {
        "simulated": False,
        "kernel": "dense fp32 (two smaller GEMMs)",
        "ranks": {n: ranks[n] for n in done},
        "skipped_layers": skipped,  # r (in + out) >= in x out, or tied to the embedding: nothing saved
        "params_before": before,
        "params_after": n_params(model),
        **extra,
    }


def apply_svd(model: nn.Module, cfg: SVDConfig, calib=None) -> dict:
    cfg.check_model(model)
    before, ranks, done = n_params(model), cfg.ranks(model), []
    for name, lin in cfg.to_factorize(model, ranks).items():
        a, b = truncated_svd(lin.weight.detach(), ranks[name])
        _replace(model, name, lin, a, b)
        done.append(name)
    return _summary(model, ranks, done, before, {})


def apply_asvd(model: nn.Module, cfg: ASVDConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    before, ranks, done = n_params(model), cfg.ranks(model), []
    todo = cfg.to_factorize(model, ranks)
    whiten = cfg.scaling == "whiten"
    runner = LayerwiseRunner(model, calib)
    seen: set[str] = set()

    def process(i: int, layer: nn.Module) -> None:
        mods = targets_in(layer, todo)
        stats = runner.collect_inputs(i, mods, lambda m: ActStats(m.in_features, gram=whiten, magnitude=not whiten))
        for n, m in mods.items():
            w, st = m.weight.detach(), stats.pop(n)
            if whiten:
                a, b = whitened_svd(w, st.xtx, ranks[n], cfg.damp)
            else:
                a, b = scaled_svd(w, st.abs_mean, ranks[n], cfg.alpha)
            _replace(model, n, m, a, b)  # the next layer sees this layer's factorized outputs
            done.append(n)
            seen.add(n)

    runner.run(process, f"{cfg.method} ({cfg.scaling}, layer by layer)")
    plain = [n for n in todo if n not in seen]  # outside the decoder layers: no inputs observed
    for n in plain:
        a, b = truncated_svd(todo[n].weight.detach(), ranks[n])
        _replace(model, n, todo[n], a, b)
        done.append(n)
    return _summary(model, ranks, done, before, {"scaling": cfg.scaling, "plain_svd_layers": plain,
                                                 "calibration_tokens": int(calib.numel())})
