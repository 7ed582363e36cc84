"""EViT token pruning for vision transformers (Liang et al., ICLR 2022, "Not All Patches are What
You Need: Expediting Vision Transformers via Token Reorganizations").

In a pruning block, after attention, the class token's attention to each patch (averaged over
heads) says how much that patch mattered to the image's summary. The block keeps the
``ceil(keep_rate * patches)`` most attended patches in their original order and, with ``fuse``,
replaces the others by one token, their attention-weighted mean (paper § 3.2, eq. 4); the MLP and
every later block run on what is left. The class token always stays first.

:func:`select_tokens` is the math on plain tensors; :func:`apply_token_prune` wraps the blocks of
a transformers ``Dinov2Model`` or of the vision tower of a ``CLIPModel`` / leanfm dual encoder
(the same block adapter as ToMe).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import LeanfmError
from .tome import ToMeLayer, _Parts, _vision_config, _vit_layers, vision_tower


def select_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, fuse: bool = True) -> torch.Tensor:
    """``x [B, N, D]`` (token 0 the class token) reduced to the class token, the
    ``ceil(keep_rate * (N - 1))`` patches with the largest ``cls_attn [B, N - 1]`` (in their
    original order) and, with ``fuse``, the attention-weighted mean of the rest."""
    b, n, d = x.shape
    patches = n - 1
    keep = max(1, math.ceil(keep_rate * patches))
    if keep >= patches:
        return x
    order = cls_attn.argsort(dim=1, descending=True)
    kept = order[:, :keep].sort(dim=1).values
    px = x[:, 1:]
    parts = [x[:, :1], px.gather(1, kept[..., None].expand(-1, -1, d))]
    if fuse:
        dropped = order[:, keep:]
        w = cls_attn.gather(1, dropped)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        parts.append((px.gather(1, dropped[..., None].expand(-1, -1, d)) * w[..., None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


class TokenPruneLayer(nn.Module):
    """A ViT block that, after its attention, keeps ``keep_rate`` of its patch tokens (EViT)."""

    def __init__(self, layer: nn.Module, keep_rate: float, fuse: bool):
        super().__init__()
        self.layer, self.keep_rate, self.fuse = layer, keep_rate, fuse
        self._parts = _Parts(layer)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        p = self._parts
        x, q, k = p.attend(hidden_states)
        # the class token's attention to the patches, averaged over heads (EViT eq. 3)
        cls_attn = ((q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)) * p.scale).softmax(dim=-1).mean(dim=1)[:, 0]
        return p.feed_forward(select_tokens(x, cls_attn, self.keep_rate, self.fuse))


def check_prune(model: nn.Module, cfg) -> None:
    """One-line error unless the config's blocks exist in ``model`` and the patch size divides the
    image size it is checked for."""
    layers = _vit_layers(model)
    c = _vision_config(model)
    size = cfg.image_size
    if size % c.patch_size:
        raise LeanfmError(f"image size {size} is not a multiple of the patch size {c.patch_size}; "
                          f"use {size // c.patch_size * c.patch_size} or {(size // c.patch_size + 1) * c.patch_size}")
    bad = [i for i in cfg.layers if i >= len(layers)]
    if bad:
        raise LeanfmError(f"token-prune layers {bad} do not exist: the model has {len(layers)} blocks (0 to {len(layers) - 1})")


def apply_token_prune(model: nn.Module, cfg) -> nn.Module:
    """Wrap the config's blocks of ``model`` (in place; returns it)."""
    check_prune(model, cfg)
    layers = _vit_layers(model)
    if any(isinstance(blk, ToMeLayer) for blk in layers):
        raise LeanfmError("tome and token-prune cannot be combined on one model: apply one token-reducing step")
    for i in sorted(set(cfg.layers)):
        if isinstance(layers[i], TokenPruneLayer):
            raise LeanfmError(f"token-prune: block {i} already prunes; apply token-prune once")
        layers[i] = TokenPruneLayer(layers[i], float(cfg.keep_rate), cfg.fuse)
    return model


def apply_token_prune_step(model: nn.Module, cfg, calib=None) -> dict:
    """The ``token-prune`` method's handler (``leanfm.apply_``): records the tokens each block then runs on."""
    apply_token_prune(model, cfg)
    c = _vision_config(model)
    layers = _vit_layers(model)
    return {"simulated": False, "kernel": f"transformers {type(vision_tower(model)).__name__} blocks with EViT token pruning "
                                          "(PyTorch eager)",
            "tokens_per_block": cfg.token_schedule(1 + (cfg.image_size // c.patch_size) ** 2, len(layers))}
