"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8.

Per input channel j of the linears sharing one input (Eq. 4):
    s_j = max|X_j|^α / max|W_:,j|^(1-α)
the producing op's output is divided by ``s`` and the weight columns multiplied by ``s``, which
leaves the float model's outputs unchanged while flattening the activation ranges, so both
weights and activations quantize to int8.

Execution here: weights are packed int8 (per output channel) and run on a real kernel; the
int8 activation quantization (per token, dynamic) is applied as fake-quant in front of each
linear because this CPU has no fast int8 x int8 GEMM path in torch (``torch._int_mm`` is slow
here). The step is therefore recorded as ``simulated: true``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...kernels.actquant import ActQuant, fake_quant_act  # noqa: F401 (fake_quant_act re-exported)
from ..fold import divide_output, find_producer
from ..layers import LayerwiseRunner, group_by_input, targets_in
from ..targets import iter_linears
from .common import install
from .decl import SmoothQuantConfig
from .gptq import check_calibration
from .grid import rtn_quantize


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant Eq. 4 for linears sharing an input with per-channel max ``act_max [in]``."""
    w_max = torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def smooth_(model: nn.Module, calib: torch.Tensor, alpha: float, skip=("lm_head",), only=(), on_layer=None) -> dict:
    """Fold SmoothQuant scales into the model in place (no quantization); returns counts.
    ``on_layer(names)``: called with each decoder layer's smoothed linears once the next layer's
    inputs are computed from them (to quantize them then)."""
    targets = dict(iter_linears(model, skip, only))
    runner = LayerwiseRunner(model, calib)
    done = {"smoothed_groups": 0, "unsmoothed_groups": 0}

    def process(i: int, layer: nn.Module) -> None:
        mods = targets_in(layer, targets)
        amax, first = {}, {}

        def hook(name):
            def fn(mod, args, out):
                x = args[0].detach()
                a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
                first.setdefault(name, x[0, :4].clone())

            return fn

        runner.run_layer_with_hooks(i, {m: hook(n) for n, m in mods.items()})
        for names in group_by_input(first):
            lins = [mods[n] for n in names]
            prod = find_producer(layer, lins, runner.input_observer(i, lins[0]))
            if prod is None:
                done["unsmoothed_groups"] += 1
                continue
            s = smooth_scales(amax[names[0]], [m.weight for m in lins], alpha)
            divide_output(prod[0], s, prod[1])
            with torch.no_grad():
                for m in lins:
                    m.weight.mul_(s)
            done["smoothed_groups"] += 1

    def layer_done(i: int, layer: nn.Module) -> None:
        if on_layer is not None:
            on_layer(list(targets_in(layer, targets)))

    runner.run(process, "smoothquant (layer by layer)", layer_done)
    return done


def apply_smoothquant(model: nn.Module, cfg: SmoothQuantConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    names = list(cfg.targets(model))
    infos = []

    def quantize(layer_names: list[str]) -> None:  # W: RTN on the smoothed weights; A: fake-quant at the input
        qws = {n: rtn_quantize(model.get_submodule(n).weight.detach(), cfg.bits, cfg.group_size, cfg.symmetric) for n in layer_names}
        if not qws:
            return
        infos.append(install(model, qws, cfg.backend, fuse=False))  # each layer fake-quantizes its own input
        for n in layer_names:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ActQuant(getattr(parent, child), cfg.act_bits))

    counts = smooth_(model, calib, cfg.alpha, cfg.skip, cfg.only, on_layer=quantize)
    quantize([n for n in names if isinstance(model.get_submodule(n), nn.Linear)])  # outside the decoder layers
    info = {**infos[-1], "layers": sum(x["layers"] for x in infos)}
    return {**info, **counts, "simulated": True,
            "kernel": f"W{cfg.bits}: {info['kernel']}; A{cfg.act_bits}: fake-quant per-token activations (no int8 GEMM)"}
