"""AWQ model glue: per decoder layer, activation-aware scales folded into the producing op,
then clipping, then round-to-nearest on the scaled, clipped weights.

Simplification vs the reference: the scale search scores the group's own linear outputs rather
than the whole attention/MLP block output (the reference's ``module2inspect``).
"""
from __future__ import annotations


import torch
from torch import nn

from ...errors import LeanfmError
from ..fold import divide_output, find_producer
from ..layers import LayerwiseRunner, group_by_input, targets_in
from .awq_math import apply_clip, search_clip, search_scale
from .common import LayerPacker, install
from .decl import AWQConfig
from .gptq import check_calibration
from .grid import dequantize, grid_quantize, resolve_group_size


class _Rows:
    """Collects a fixed subset of rows of each linear's input (same rows for shared inputs)."""

    def __init__(self, per_call: int):
        self.per_call, self.calls, self.x = per_call, {}, {}

    def hook(self, name):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            c = self.calls.get(name, 0)
            self.calls[name] = c + 1
            g = torch.Generator().manual_seed(c)
            idx = torch.randperm(x.shape[0], generator=g)[: self.per_call]
            self.x.setdefault(name, []).append(x[idx].float())

        return fn

    def get(self, name) -> torch.Tensor:
        return torch.cat(self.x[name])


def apply_awq(model: nn.Module, cfg: AWQConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    targets = cfg.targets(model)
    runner = LayerwiseRunner(model, calib)
    qws, pending, seen, alphas, folded, unfolded = {}, {}, set(), [], 0, []
    packed = LayerPacker(model, cfg.backend)
    per_call = -(-cfg.scale_tokens // calib.shape[0])

    def process(i: int, layer: nn.Module) -> None:
        nonlocal folded
        mods = targets_in(layer, targets)
        rows = _Rows(per_call)
        runner.run_layer_with_hooks(i, {m: rows.hook(n) for n, m in mods.items()})
        xs = {n: rows.get(n) for n in mods}
        groups = group_by_input(xs)  # linears that saw the same input share one scale

        scaled_x = {}
        for names in groups:  # 1) all scale searches and folds (on fp weights)
            lins = [mods[n] for n in names]
            gs = resolve_group_size(lins[0].in_features, cfg.group_size, names[0])
            prod = find_producer(layer, lins, runner.input_observer(i, lins[0]))
            x = xs[names[0]]
            if prod is not None:
                s, a = search_scale(x, [m.weight for m in lins], cfg.bits, gs, cfg.symmetric, cfg.n_grid, cfg.rounding)
                divide_output(prod[0], s, prod[1])
                with torch.no_grad():
                    for m in lins:
                        m.weight.mul_(s)
                x = x / s
                alphas.append(a)
                folded += 1
            else:
                unfolded.append(names[0])
            scaled_x.update({n: x for n in names})
        for n, m in mods.items():  # 2) clip and quantize the final (scaled, folded) weights
            gs = resolve_group_size(m.in_features, cfg.group_size, n)
            w = m.weight.detach()
            if cfg.clip:
                w = apply_clip(w, search_clip(scaled_x[n][: cfg.clip_tokens], w, cfg.bits, gs, cfg.symmetric, cfg.n_grid,
                                              rounding=cfg.rounding), gs)
            pending[n] = grid_quantize(w, cfg.bits, cfg.group_size, cfg.symmetric, cfg.rounding)
            with torch.no_grad():  # the next layer sees this layer quantized
                m.weight.copy_(dequantize(pending[n].codes, pending[n].scale, pending[n].zero, pending[n].group_size))

    def done(i: int, layer: nn.Module) -> None:  # packed as soon as the layer's outputs are computed
        packed(dict(pending))
        seen.update(pending)
        pending.clear()

    runner.run(process, "awq (layer by layer)", done)
    for n, m in targets.items():
        if n not in seen:
            qws[n] = grid_quantize(m.weight.detach(), cfg.bits, cfg.group_size, cfg.symmetric, cfg.rounding)
    del runner
    info = {**install(model, qws, cfg.backend), "layers": packed.count + len(qws)}
    return {**info, "scaled_groups": folded, "unscaled_groups": len(unfolded),
            "mean_alpha": round(sum(alphas) / len(alphas), 3) if alphas else None, "calibration_tokens": int(calib.numel())}
