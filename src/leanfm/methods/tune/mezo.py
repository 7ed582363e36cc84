"""MeZO: memory-efficient zeroth-order SGD (pure tensor functions).

Malladi et al. (2023), "Fine-Tuning Language Models with Just Forward Passes", Algorithm 1 and
eq. (1)-(2): with z ~ N(0, I) drawn from a seed s, the SPSA estimate of the gradient along z is

    g = (L(θ + εz) − L(θ − εz)) / (2ε),      θ ← θ − η · g · z.

z is never stored: the same seed regenerates it for each perturbation and for the update, so the
memory is that of inference (z is drawn and applied :data:`BLOCK` values at a time).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


BLOCK = 1 << 20  # elements of z drawn at a time (4 MB), instead of one parameter-sized temporary


def _each_z(params: Sequence[torch.Tensor], seed: int):
    """(slice of a parameter, its z) pairs, z drawn block by block from ``seed``: the same z
    every call with the same seed and parameters, never more than :data:`BLOCK` values of it."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        if not p.data.is_contiguous():
            yield p.data, torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            continue
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), BLOCK):
            part = flat[i : i + BLOCK]
            yield part, torch.randn(part.numel(), generator=g, dtype=torch.float32).to(p.dtype)


def perturb_(params: Sequence[torch.Tensor], scale: float, seed: int) -> None:
    """θ ← θ + scale · z in place, z drawn from ``seed`` (the same z every call with the same seed)."""
    for part, z in _each_z(params, seed):
        part.add_(z, alpha=scale)


@torch.no_grad()
def mezo_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], eps: float, lr: float, seed: int,
              weight_decay: float = 0.0) -> dict:
    """One MeZO step on ``params`` (in place). ``loss_fn()`` evaluates the loss of the current
    parameters on this step's batch (the same batch for both calls). Returns the two losses and
    the projected gradient g."""
    perturb_(params, eps, seed)
    loss_plus = float(loss_fn())
    perturb_(params, -2 * eps, seed)
    loss_minus = float(loss_fn())
    perturb_(params, eps, seed)  # back to θ (up to rounding)
    grad = (loss_plus - loss_minus) / (2 * eps)
    if weight_decay:
        for p in params:
            p.data.mul_(1 - lr * weight_decay)
    for part, z in _each_z(params, seed):
        part.add_(z, alpha=-lr * grad)
    return {"loss_plus": loss_plus, "loss_minus": loss_minus, "projected_grad": grad, "loss": (loss_plus + loss_minus) / 2}
