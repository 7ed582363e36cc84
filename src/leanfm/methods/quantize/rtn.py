"""RTN (round-to-nearest) weight-only quantization: the calibration-free baseline.

The math is in :mod:`.grid`; packing and execution follow the config's ``backend``.
"""
from __future__ import annotations

from torch import nn

from .common import install
from .decl import RTNConfig
from .grid import grid_quantize


def apply_rtn(model: nn.Module, cfg: RTNConfig, calib=None) -> dict:
    cfg.check_model(model)  # every layer is validated before any is touched
    qws = {name: grid_quantize(mod.weight.detach(), cfg.bits, cfg.group_size, cfg.symmetric, cfg.rounding)
           for name, mod in cfg.targets(model).items()}
    return install(model, qws, cfg.backend)
