"""RTN (round-to-nearest) weight-only quantization: the calibration-free baseline.

The math is in :mod:`.grid`; packing and execution follow the config's ``backend``.
"""
from __future__ import annotations

from torch import nn

from ...formats.gguf_blocks import llama_grid
from .common import install
from .decl import RTNConfig
from .grid import rtn_quantize


def apply_rtn(model: nn.Module, cfg: RTNConfig, calib=None) -> dict:
    cfg.check_model(model)  # every layer is validated before any is touched
    if cfg.rounding == "llama.cpp":  # llama.cpp's own reference quantizer for the block type
        qws = {name: llama_grid(mod.weight.detach(), cfg.gguf_type()) for name, mod in cfg.targets(model).items()}
    else:
        qws = {name: rtn_quantize(mod.weight.detach(), cfg.bits, cfg.group_size, cfg.symmetric) for name, mod in cfg.targets(model).items()}
    return install(model, qws, cfg.backend)
