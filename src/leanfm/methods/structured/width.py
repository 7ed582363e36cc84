"""Width pruning: remove whole key/value head groups and MLP intermediate channels.

Hugging Face configs hold one ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size`` for all layers, so the same *number* is removed from every layer while
*which* groups/channels go is chosen per layer by calibration importance (:mod:`.width_math`).
Layers are pruned in order with :class:`~..layers.LayerwiseRunner`, so each layer's statistics
come from the already-pruned layers before it. Tensors are physically sliced (q/k/v rows,
o_proj columns, gate/up rows, down_proj columns, biases) and the config updated (``head_dim``
written explicitly), so ``save_pretrained`` gives a smaller plain checkpoint.

Layers are found by the usual Hugging Face projection names (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``; ``gate_proj`` (optional), ``up_proj``, ``down_proj``); families with
fused projections (``qkv_proj``, ``gate_up_proj``) are refused with a one-line error.
"""
from __future__ import annotations

import torch
from torch import nn

from ...models.family import decoder_config
from ..layers import LayerwiseRunner, capture_inputs
from .common import check_calibration, n_params
from .decl import WidthPruneConfig  # noqa: F401 (re-exported)
from .width_math import group_rows, keep_top, kv_group_importance, mlp_channel_importance, slice_linear

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("up_proj", "down_proj")


def _find(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for mod in layer.modules():
        if all(isinstance(getattr(mod, n, None), nn.Linear) for n in names):
            gate = getattr(mod, "gate_proj", None)
            if names == MLP and gate is not None and not isinstance(gate, nn.Linear):
                return None
            return mod
    return None


def prune_attention_groups(attn: nn.Module, keep: torch.Tensor, heads_per_group: int, head_dim: int) -> None:
    """Keep key/value groups ``keep`` of ``attn``: their query heads' q rows and o_proj columns,
    their k/v rows (query head h reads KV head h // heads_per_group, as ``repeat_kv`` lays out)."""
    q_rows, kv_rows = group_rows(keep, heads_per_group, head_dim), group_rows(keep, 1, head_dim)
    slice_linear(attn.q_proj, rows=q_rows)
    slice_linear(attn.k_proj, rows=kv_rows)
    slice_linear(attn.v_proj, rows=kv_rows)
    slice_linear(attn.o_proj, cols=q_rows)
    n = len(keep)
    for key, value in (("num_heads", n * heads_per_group), ("num_attention_heads", n * heads_per_group), ("num_key_value_heads", n)):
        if isinstance(getattr(attn, key, None), int):
            setattr(attn, key, value)


def prune_mlp_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels ``keep``: gate/up rows, down_proj columns."""
    for name in ("gate_proj", "up_proj"):
        if isinstance(getattr(mlp, name, None), nn.Linear):
            slice_linear(getattr(mlp, name), rows=keep)
    slice_linear(mlp.down_proj, cols=keep)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(keep)


def set_config_sizes(model: nn.Module, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> None:
    conf = decoder_config(model)
    conf.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size = heads, kv_heads, intermediate


def apply_width(model: nn.Module, cfg: WidthPruneConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    p = cfg.plan(model)
    prune_heads, prune_mlp = p["keep_kv"] < p["kv"], p["keep_inter"] < p["inter"]
    rep = p["heads"] // p["kv"]
    before = n_params(model)
    runner = LayerwiseRunner(model, calib)
    dropped_groups: list[list[int]] = []

    def process(i: int, layer: nn.Module) -> None:
        attn, mlp = _find(layer, ATTN), _find(layer, MLP)
        watch = {}
        if prune_heads:
            watch["o"] = attn.o_proj
        if prune_mlp:
            watch["down"] = mlp.down_proj
        sumsq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in watch.items()}

        def add(n: str, x: torch.Tensor) -> None:
            sumsq[n] += x.double().pow(2).sum(0)

        handles = capture_inputs(watch, add)
        try:
            runner.run_layer(i)
        finally:
            for h in handles:
                h.remove()
        if prune_heads:
            imp = kv_group_importance(sumsq["o"], attn.o_proj.weight.detach(), p["head_dim"], p["kv"])
            keep = keep_top(imp, p["keep_kv"])
            prune_attention_groups(attn, keep, rep, p["head_dim"])
            dropped_groups.append(sorted(set(range(p["kv"])) - set(keep.tolist())))
        if prune_mlp:
            prune_mlp_channels(mlp, keep_top(mlp_channel_importance(sumsq["down"], mlp.down_proj.weight.detach()), p["keep_inter"]))

    runner.run(process, "width pruning (layer by layer)")
    set_config_sizes(model, p["keep_kv"] * rep, p["keep_kv"], p["head_dim"], p["keep_inter"])
    info = {
        "simulated": False,
        "kernel": "dense fp32 (narrower layers)",
        "num_attention_heads": [p["heads"], p["keep_kv"] * rep],
        "num_key_value_heads": [p["kv"], p["keep_kv"]],
        "intermediate_size": [p["inter"], p["keep_inter"]],
        "params_before": before,
        "params_after": n_params(model),
        "calibration_tokens": int(calib.numel()),
    }
    if prune_heads:
        info["dropped_kv_groups"] = dropped_groups
    elif cfg.heads_fraction > 0:
        info["note"] = f"heads_fraction={cfg.heads_fraction} rounds to 0 of {p['kv']} key/value groups: attention unchanged"
    return info
