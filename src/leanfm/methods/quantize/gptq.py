"""GPTQ model glue: layer-by-layer Hessians from calibration activations, then
:func:`.gptq_math.gptq_quantize` per linear layer.

As in the reference (``llama_sequential``), each decoder layer's inputs are the outputs of the
already-quantized previous layers, and only one layer's activations are held at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError
from ..layers import LayerwiseRunner, targets_in
from .common import install, LayerPacker
from .decl import GPTQConfig, check_obs_params  # noqa: F401 (check_obs_params re-exported)
from .gptq_math import HessianAccumulator, gptq_quantize
from .grid import grid_quantize


def check_calibration(calib: torch.Tensor, method: str, min_tokens: int = 256) -> None:
    """Token ids ``[n_samples, seqlen]`` of at least ``min_tokens`` tokens, or (a ViT) float images
    ``[n_samples, 3, H, W]``; else a one-line error."""
    if isinstance(calib, torch.Tensor) and calib.dim() == 4 and calib.is_floating_point() and calib.shape[0] >= 1:
        return
    if calib is None or not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise LeanfmError(f"{method} needs calibration token ids [n_samples, seqlen] (a ViT: images [n, 3, H, W]); got an "
                          "empty or missing set")
    if calib.numel() < min_tokens:
        raise LeanfmError(
            f"{method} calibration set has only {calib.numel()} tokens; it needs at least {min_tokens} "
            "(raise --calib-samples or --calib-seqlen)"
        )


def calibration_info(calib: torch.Tensor) -> dict:
    """What a run records of its calibration set: tokens, or images for a ViT."""
    if calib.dim() == 4:
        return {"calibration_images": int(calib.shape[0])}
    return {"calibration_tokens": int(calib.numel())}


def gptq_layerwise(model: nn.Module, targets: dict, calib: torch.Tensor, grid_of, damp: float, block_size: int,
                   act_order: bool, label: str = "gptq", on_layer=None) -> dict:
    """GPTQ over the decoder layers in order, each linear on its own grid: ``grid_of(name)`` gives
    ``(bits, group_size, symmetric, rounding)``. Returns ``{name: QuantizedWeight}``; linears outside
    the decoder stack (e.g. an unskipped lm_head: no layer inputs collected) get RTN on their grid.
    ``on_layer(qws)``: called with each decoder layer's weights once its outputs for the next
    layer are computed (to pack them at once); those are then not in the returned dict."""
    from .grid import dequantize

    runner = LayerwiseRunner(model, calib)
    qws, pending = {}, {}
    in_layers = set()

    def process(i: int, layer: nn.Module) -> None:
        mods = targets_in(layer, targets)
        in_layers.update(mods)
        hess = runner.collect_inputs(i, mods, lambda m: HessianAccumulator(m.in_features), share_equal_inputs=True)
        for n, m in mods.items():
            bits, gs, sym, rounding = grid_of(n)
            pending[n] = gptq_quantize(m.weight.detach(), hess[n].H, bits, gs, sym, damp, block_size, act_order, rounding)
            del hess[n]
        # the next layer must see this layer's *quantized* outputs: fake-quant now, pack when done
        with torch.no_grad():
            for n, qw in pending.items():
                targets[n].weight.copy_(dequantize(qw.codes, qw.scale, qw.zero, qw.group_size))

    def done(i: int, layer: nn.Module) -> None:
        if on_layer is not None:
            on_layer(dict(pending))
        else:
            qws.update(pending)
        pending.clear()

    runner.run(process, f"{label} (layer by layer)", done)
    del runner
    for n, m in targets.items():
        if n not in in_layers:
            qws[n] = grid_quantize(m.weight.detach(), *grid_of(n))
    return qws


def apply_gptq(model: nn.Module, cfg: GPTQConfig, calib: torch.Tensor) -> dict:
    cfg.check_model(model)
    check_calibration(calib, cfg.method)
    grid = (cfg.bits, cfg.group_size, cfg.symmetric, cfg.rounding)
    packed = LayerPacker(model, cfg.backend)
    rest = gptq_layerwise(model, cfg.targets(model), calib, lambda n: grid, cfg.damp, cfg.block_size, cfg.act_order,
                          on_layer=packed)
    return {**install(model, rest, cfg.backend), "layers": packed.count + len(rest), **calibration_info(calib)}
