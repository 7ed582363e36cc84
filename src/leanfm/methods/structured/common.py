"""Helpers shared by the structured and low-rank methods."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError
from .decl import check_fraction, round_half_up  # noqa: F401 (torch-free, in the declarations; re-exported)


def check_calibration(calib, method: str) -> None:
    """One-line error unless ``calib`` is a non-empty ``[n_samples, seqlen]`` tensor of token ids."""
    if calib is None or not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise LeanfmError(f"{method} needs calibration token ids [n_samples, seqlen]; got an empty or missing set")


def n_params(model: nn.Module) -> int:
    """Parameters counted once (tied embeddings / LM head share one tensor)."""
    return sum(p.numel() for p in model.parameters())
