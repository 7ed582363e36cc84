"""Declarations of the low-rank methods ``svd`` and ``asvd`` (no torch).

Each config holds its parameters, validation and cost effect; the handlers that factorize the
layers live in :mod:`.lowrank` and are imported on first apply.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ..effects import LowRankSpec, Rule
from ..structured.decl import check_fraction
from .rank import rank_for, saves_params
from ...space import Choice, Range

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

    search_space = {"param_ratio": Range(0.5, 0.95, step=0.05)}

    method = "svd"
    handler = "leanfm.methods.lowrank.lowrank:apply_svd"
    produces = "low-rank"
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

    def targets(self, model) -> dict:
        """``{name: nn.Linear}`` of the layers this step factorizes (not the factors of earlier ones)."""
        from ..targets import iter_linears
        from ...kernels.lowrank import LowRankLinear

        inner = {id(m) for lr in model.modules() if isinstance(lr, LowRankLinear) for m in (lr.a, lr.b)}
        return {n: m for n, m in iter_linears(model, self.skip, self.only) if id(m) not in inner}

    def ranks(self, model) -> dict[str, int]:
        return {n: rank_for(m.out_features, m.in_features, rank=self.rank, rank_ratio=self.rank_ratio,
                            param_ratio=self.param_ratio, name=n) for n, m in self.targets(model).items()}

    def to_factorize(self, model, ranks: dict[str, int]) -> dict:
        """Targets whose factors hold fewer parameters. A layer sharing its weight with the input
        embedding (a tied lm_head) never qualifies: the embedding keeps the full matrix anyway."""
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = getattr(emb, "weight", None)
        return {n: m for n, m in self.targets(model).items()
                if saves_params(m.out_features, m.in_features, ranks[n]) and m.weight is not tied}

    def check_model(self, model) -> None:
        if not self.targets(model):
            raise LeanfmError(f"{self.method} found no nn.Linear layers to factorize (check 'skip' and 'only')")
        self.ranks(model)  # raises for a rank of 0 or above min(out, in)

    def effect(self, eff) -> None:
        spec = LowRankSpec(self.method, self.param_ratio, self.rank_ratio, self.rank)
        eff.rules.append(Rule(spec, tuple(self.skip), tuple(self.only)))


@dataclass
class ASVDConfig(SVDConfig):
    """Activation-aware SVD (calibration). The SVDConfig fields, plus:

    scaling: "whiten" (default; SVD-LLM Cholesky whitening of X^T X, optimal output error) or
        "diag" (ASVD's per-input-channel scaling by mean |x|^alpha).
    alpha: exponent of the diag scaling (ASVD paper: 0.5).
    damp: whitening adds damp x mean(diag(X^T X)) to the diagonal before Cholesky.
    """

    method = "asvd"
    handler = "leanfm.methods.lowrank.lowrank:apply_asvd"
    needs_calibration = True
    scaling: str = "whiten"
    alpha: float = 0.5
    damp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.scaling not in SCALINGS:
            raise LeanfmError(f"unknown scaling '{self.scaling}' for {self.method}; use one of: {', '.join(SCALINGS)}")
        if not 0 < self.alpha <= 2:
            raise LeanfmError(f"alpha={self.alpha} must be in (0, 2]")
        if not 0 <= self.damp < 1:
            raise LeanfmError(f"damp={self.damp} must be in [0, 1)")
