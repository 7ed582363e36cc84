"""Declarations of the structured pruning methods ``layerdrop`` and ``width`` (no torch).

Each config holds its parameters, validation and cost effect; the handlers that remove layers
or channels live in :mod:`.layerdrop` and :mod:`.width` and are imported on first apply.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ...space import Choice, Range


def check_fraction(name: str, value, allow_zero: bool = False) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    if value is None or not (lo_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise LeanfmError(f"{name}={value} must be in {interval}")


def round_half_up(x: float) -> int:
    return int(x + 0.5)


@dataclass
class LayerDropConfig(BaseConfig):
    """Drop whole decoder layers, the least influential first (ShortGPT block influence).

    Give exactly one of
    fraction: share of the decoder layers to drop, in (0, 1); the count is rounded half up
        (25% of SmolLM2's 30 layers drops 8; at least one layer is dropped);
    count: number of layers to drop (>= 1, fewer than the model has).
    """

    search_space = {"fraction": Range(0.05, 0.35, step=0.05)}

    method = "layerdrop"
    handler = "leanfm.methods.structured.layerdrop:apply_layerdrop"
    needs_calibration = True
    onload = "layerwise"
    produces = "smaller-dense"
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

    def check_model(self, model) -> None:
        from ..layers import decoder_layers

        n = len(decoder_layers(model))
        if self.n_drop(n) >= n:
            raise LeanfmError(f"layerdrop would drop {self.n_drop(n)} of the model's {n} decoder layers; keep at least one")

    def effect(self, eff) -> None:
        eff.drop = (self.fraction, self.count)


@dataclass
class WidthPruneConfig(BaseConfig):
    """Prune attention-head groups and MLP channels, the same number in every layer.

    heads_fraction: share of key/value groups to remove, in [0, 1) (a group is one KV head with the
        query heads that share it, so num_attention_heads and num_key_value_heads shrink together;
        with MHA a group is one head). The count is rounded half up: 0.25 of SmolLM2's 3 groups
        removes 1 (33% of heads); at least one group must remain.
    mlp_fraction: share of MLP intermediate channels to remove, in [0, 1), rounded half up.
    At least one of the two must be > 0.
    """

    search_space = {"mlp_fraction": Range(0.05, 0.5, step=0.05)}

    method = "width"
    handler = "leanfm.methods.structured.width:apply_width"
    needs_calibration = True
    produces = "smaller-dense"
    heads_fraction: float = 0.0
    mlp_fraction: float = 0.0

    def validate(self) -> None:
        check_fraction("heads_fraction", self.heads_fraction, allow_zero=True)
        check_fraction("mlp_fraction", self.mlp_fraction, allow_zero=True)
        if self.heads_fraction == 0 and self.mlp_fraction == 0:
            raise LeanfmError("width pruning needs heads_fraction > 0 or mlp_fraction > 0")

    def plan(self, model) -> dict:
        """Sizes before/after from the config; one-line errors for what cannot be pruned."""
        from ...models.family import decoder_config

        cfg = decoder_config(model)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        inter = cfg.intermediate_size
        if not isinstance(inter, int):
            raise LeanfmError(f"width pruning needs one intermediate_size for all layers; this config has {inter!r}")
        drop_groups = round_half_up(self.heads_fraction * kv)
        if drop_groups >= kv:
            raise LeanfmError(f"heads_fraction={self.heads_fraction} would remove {drop_groups} of {kv} key/value groups, leaving 0; lower it")
        drop_ch = round_half_up(self.mlp_fraction * inter)
        if drop_ch >= inter:
            raise LeanfmError(f"mlp_fraction={self.mlp_fraction} would remove all {inter} MLP channels; lower it")
        return {"heads": heads, "kv": kv, "head_dim": head_dim, "inter": inter, "keep_kv": kv - drop_groups, "keep_inter": inter - drop_ch}

    def check_model(self, model) -> None:
        from ..layers import decoder_layers
        from .width import ATTN, MLP, _find

        p = self.plan(model)
        for i, layer in enumerate(decoder_layers(model)):
            attn, mlp = _find(layer, ATTN), _find(layer, MLP)
            if attn is None or mlp is None:
                raise LeanfmError(
                    f"width pruning found no q/k/v/o_proj and up/down_proj nn.Linear layers in decoder layer {i} "
                    "(fused projections, or already quantized/factorized: apply width pruning first)"
                )
            if attn.q_proj.out_features != p["heads"] * p["head_dim"] or mlp.down_proj.in_features != p["inter"]:
                raise LeanfmError(f"decoder layer {i} does not match the config's head count / intermediate_size")

    def effect(self, eff) -> None:
        eff.width = (float(self.heads_fraction), float(self.mlp_fraction))
