"""The training loop shared by the tuning methods: windows of training text, optimizer and
schedule, the loss of each method, and a record of what it did (loss curve, tokens, seconds).

Memory and energy are measured by the caller around the whole step (:mod:`leanfm.training`);
this loop records only what it alone knows.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from ...allocator import fix_mmap_threshold
from ...errors import LeanfmError
from .kd import chunked_next_token_loss, hidden_loss, kd_loss, next_token_loss


def training_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[n, seqlen]`` windows of the token stream: non-overlapping, shuffled with ``seed``; when
    the text holds fewer than ``n``, every window is used once per epoch in a fresh order."""
    per = ids.numel() // seqlen
    if per < 1:
        raise LeanfmError(f"the training text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
                          "use more text or a smaller seqlen")
    chunks = ids[: per * seqlen].view(per, seqlen)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(per, generator=g) for _ in range(math.ceil(n / per))])[:n]
    return chunks[order]


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then constant
    or cosine decay to zero at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))


def make_optimizer(cfg, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        from .adapters import require

        bnb = require("bitsandbytes")
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def loss_fn(cfg, teacher: nn.Module | None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The training loss of ``cfg``'s method on a batch of token ids."""
    if teacher is None and not cfg.backward:  # zeroth order: forward only, logits a chunk at a time
        return lambda model, ids: chunked_next_token_loss(model, ids)
    if teacher is None:
        return lambda model, ids: next_token_loss(model(ids, use_cache=False).logits, ids)
    want_hidden = cfg.hidden_weight > 0

    def distill(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(ids, use_cache=False, output_hidden_states=want_hidden)
        s = model(ids, use_cache=False, output_hidden_states=want_hidden)
        loss = cfg.kd_weight * kd_loss(s.logits, t.logits, cfg.temperature)
        if cfg.kd_weight < 1:
            loss = loss + (1 - cfg.kd_weight) * next_token_loss(s.logits, ids)
        if want_hidden:
            loss = loss + cfg.hidden_weight * hidden_loss(s.hidden_states[-1], t.hidden_states[-1])
        return loss

    return distill


def train(model: nn.Module, cfg, windows: torch.Tensor, teacher: nn.Module | None = None,
          masks: dict[str, torch.Tensor] | None = None, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model``'s parameters that require grad for ``cfg.steps`` steps of ``cfg.batch``
    windows (backpropagation, or MeZO for a zeroth-order config). ``masks`` (module name → bool
    mask) keep pruned weights at zero. Returns the loss curve and counts."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LeanfmError(f"{cfg.method}: nothing to train (no parameter requires grad)")
    lossf = loss_fn(cfg, teacher)
    mods = dict(model.named_modules())
    masked = [(mods[n].weight, m) for n, m in (masks or {}).items() if mods[n].weight.requires_grad]
    curve: list[float] = []
    tokens = 0
    threshold = fix_mmap_threshold()  # freed transients go back to the OS (leanfm.allocator)
    t0 = time.perf_counter()
    if cfg.backward:
        hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in masked]
        opt = make_optimizer(cfg, params)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.schedule))
        model.train()
        try:
            for step in range(cfg.steps):
                ids = windows[step * cfg.batch : (step + 1) * cfg.batch]
                loss = lossf(model, ids)
                if not torch.isfinite(loss):
                    raise LeanfmError(f"{cfg.method}: the loss became {loss.item()} at step {step + 1}; lower lr (now {cfg.lr})")
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for w, m in masked:
                        w.mul_(m)
                curve.append(loss.item())
                tokens += ids.numel()
                if on_step:
                    on_step(step, curve[-1])
        finally:
            model.eval()
            for h in hooks:
                h.remove()
    else:
        from .mezo import mezo_step

        for step in range(cfg.steps):
            ids = windows[step * cfg.batch : (step + 1) * cfg.batch]
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.schedule)
            out = mezo_step(params, lambda: lossf(model, ids), cfg.eps, lr, seed=cfg.seed * 1_000_003 + step,
                            weight_decay=cfg.weight_decay)
            with torch.no_grad():
                for w, m in masked:
                    w.mul_(m)
            if not math.isfinite(out["loss"]):
                raise LeanfmError(f"mezo: the loss became {out['loss']} at step {step + 1}; lower lr (now {cfg.lr}) or eps")
            curve.append(out["loss"])
            tokens += ids.numel()  # training-text tokens (each goes through two forward passes)
            if on_step:
                on_step(step, curve[-1])
    seconds = time.perf_counter() - t0
    return {"loss_curve": [round(x, 5) for x in curve], "train_tokens": tokens, "train_seconds": seconds,
            "train_tokens_per_s": tokens / seconds if seconds > 0 else None, "malloc_mmap_threshold": threshold}
