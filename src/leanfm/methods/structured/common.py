"""Helpers shared by the structured and low-rank methods."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError


def check_calibration(calib, method: str) -> None:
    """One-line error unless ``calib`` is a non-empty ``[n_samples, seqlen]`` tensor of token ids."""
    if calib is None or not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise LeanfmError(f"{method} needs calibration token ids [n_samples, seqlen]; got an empty or missing set")


def check_fraction(name: str, value, allow_zero: bool = False) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    if value is None or not (lo_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise LeanfmError(f"{name}={value} must be in {interval}")


def n_params(model: nn.Module) -> int:
    """Parameters counted once (tied embeddings / LM head share one tensor)."""
    return sum(p.numel() for p in model.parameters())


def round_half_up(x: float) -> int:
    return int(x + 0.5)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
