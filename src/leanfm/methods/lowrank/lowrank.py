"""Low-rank factorization techniques ``svd`` and ``asvd``: configs and model glue.

Each target ``nn.Linear`` (all but ``skip``; only ``only`` when given) is replaced by a
:class:`.module.LowRankLinear` when its rank r saves parameters (r (in + out) < in x out);
layers where it would not are left dense and listed under ``skipped_layers``.

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

from dataclasses import dataclass

import torch
from torch import nn

from ...config import BaseConfig, register
from ...errors import LeanfmError
from ..layers import LayerwiseRunner, targets_in
from ..structured.common import check_calibration, check_fraction, n_params, set_module
from ..targets import iter_linears
from .module import LowRankLinear
from .rank import rank_for, saves_params
from .svd_math import ActStats, scaled_svd, truncated_svd, whitened_svd

SCALINGS = ("whiten", "diag")


@dataclass
class SVDConfig(BaseConfig):
    """Plain truncated SVD of each linear layer's weight (no calibration).

    param_ratio: kept / original parameters per layer, in (0, 1): r = floor(p * out * in / (out + in)).
    rank_ratio: alternatively r = floor(rank_ratio * min(out, in)), rank_ratio in (0, 1].
    rank: alternatively one explicit rank for every layer (>= 1, at most min(out, in)).
    Precedence: rank, then rank_ratio, then param_ratio (default 0.7).
    skip / only: layer name patterns, as for the quantizers (lm_head skipped by default).
    """

    method = "svd"
    param_ratio: float | None = 0.7
    rank_ratio: float | None = None
    rank: int | None = None
    skip: tuple[str, ...] = ("lm_head",)
    only: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise LeanfmError(f"rank={self.rank} must be >= 1")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise LeanfmError(f"rank_ratio={self.rank_ratio} must be in (0, 1]")
        if self.param_ratio is not None:
            check_fraction("param_ratio", self.param_ratio)
        if self.rank is None and self.rank_ratio is None and self.param_ratio is None:
            raise LeanfmError(f"{self.method} needs one of rank, rank_ratio or param_ratio")

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        inner = {id(m) for lr in model.modules() if isinstance(lr, LowRankLinear) for m in (lr.a, lr.b)}
        return {n: m for n, m in iter_linears(model, self.skip, self.only) if id(m) not in inner}

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {n: rank_for(m.out_features, m.in_features, rank=self.rank, rank_ratio=self.rank_ratio,
                            param_ratio=self.param_ratio, name=n) for n, m in self.targets(model).items()}

    def to_factorize(self, model: nn.Module, ranks: dict[str, int]) -> dict[str, nn.Linear]:
        """Targets whose factors hold fewer parameters. A layer sharing its weight with the input
        embedding (a tied lm_head) never qualifies: the embedding keeps the full matrix anyway."""
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = getattr(emb, "weight", None)
        return {n: m for n, m in self.targets(model).items()
                if saves_params(m.out_features, m.in_features, ranks[n]) and m.weight is not tied}

    def check_model(self, model: nn.Module) -> None:
        if not self.targets(model):
            raise LeanfmError(f"{self.method} found no nn.Linear layers to factorize (check 'skip' and 'only')")
        self.ranks(model)  # raises for a rank of 0 or above min(out, in)


@dataclass
class ASVDConfig(SVDConfig):
    """Activation-aware SVD (calibration). The SVDConfig fields, plus:

    scaling: "whiten" (default; SVD-LLM Cholesky whitening of X^T X, optimal output error) or
        "diag" (ASVD's per-input-channel scaling by mean |x|^alpha).
    alpha: exponent of the diag scaling (ASVD paper: 0.5).
    damp: whitening adds damp x mean(diag(X^T X)) to the diagonal before Cholesky.
    """

    method = "asvd"
    needs_calibration = True
    scaling: str = "whiten"
    alpha: float = 0.5
    damp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.scaling not in SCALINGS:
            raise LeanfmError(f"unknown scaling '{self.scaling}' for asvd; use one of: {', '.join(SCALINGS)}")
        if not 0 < self.alpha <= 2:
            raise LeanfmError(f"alpha={self.alpha} must be in (0, 2]")
        if not 0 <= self.damp < 1:
            raise LeanfmError(f"damp={self.damp} must be in [0, 1)")


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


@register(SVDConfig)
def apply_svd(model: nn.Module, cfg: SVDConfig, calib=None) -> dict:
    cfg.check_model(model)
    before, ranks, done = n_params(model), cfg.ranks(model), []
    for name, lin in cfg.to_factorize(model, ranks).items():
        a, b = truncated_svd(lin.weight.detach(), ranks[name])
        _replace(model, name, lin, a, b)
        done.append(name)
    return _summary(model, ranks, done, before, {})


@register(ASVDConfig)
def apply_asvd(model: nn.Module, cfg: ASVDConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, "asvd")
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

    runner.run(process, f"asvd ({cfg.scaling}, layer by layer)")
    plain = [n for n in todo if n not in seen]  # outside the decoder layers: no inputs observed
    for n in plain:
        a, b = truncated_svd(todo[n].weight.detach(), ranks[n])
        _replace(model, n, todo[n], a, b)
        done.append(n)
    return _summary(model, ranks, done, before, {"scaling": cfg.scaling, "plain_svd_layers": plain,
                                                 "calibration_tokens": int(calib.numel())})
