"""ToMe: token merging for vision transformers (Bolya et al., ICLR 2023, "Token Merging: Your ViT but Faster").

In every block, after attention, ``r`` tokens are merged into others, so each later block runs on
fewer tokens; nothing is trained. The three pieces (paper § 3):

- **Bipartite soft matching** (:func:`bipartite_soft_matching`): split the tokens alternately
  into sets A and B; connect each A token to its most similar B token (cosine of the attention
  keys averaged over heads, the "metric"); keep the ``r`` most similar edges and merge each
  chosen A token into its B partner. The class token is never merged.
- **Merging by size** (:func:`merge_by_size`): each token carries the number of patches it
  stands for, ``s``; a merge averages the features weighted by ``s`` and adds the sizes.
- **Proportional attention** (:func:`proportional_attention`, eq. 1): ``softmax(QKᵀ/√d + log s)``,
  so a token that stands for ``s`` patches gets the attention ``s`` copies of it would.

:func:`apply_tome` puts this into a transformers ``Dinov2Model`` or the vision tower of a
``CLIPModel`` (or a leanfm dual encoder) by wrapping its blocks; the math functions take plain
tensors and are tested on their own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LeanfmError
from .decl import merge_schedule


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True):
    """The merge of ``r`` tokens that ``metric [B, N, C]`` chooses, as a function ``merge(x, reduce)``
    that maps ``x [B, N, D]`` to ``[B, N - r, D]`` (``reduce``: "sum" or "mean" over merged tokens).
    ``protect_first``: token 0 (the class token) is never merged away and stays first."""
    n = metric.shape[1]
    if r <= 0:
        return lambda x, reduce="sum": x
    n_a = (n + 1) // 2
    if r > n_a - int(protect_first):
        raise LeanfmError(f"ToMe cannot merge r={r} of {n} tokens in one block (at most {n_a - int(protect_first)}); "
                          "lower r")
    with torch.no_grad():
        m = F.normalize(metric.float(), dim=-1)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, n_a, n_b]
        if protect_first:
            scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
        order = node_max.argsort(dim=-1, descending=True)[..., None]
        src_idx = order[:, :r]  # A tokens merged away
        unm_idx = order[:, r:].sort(dim=1).values  # A tokens kept, in their original order (class token first)
        dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        d = x.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, d))
        moved = src.gather(1, src_idx.expand(-1, -1, d))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, d), moved, reduce=reduce)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_by_size(merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the merged tokens ``x [B, N, D]``; ``size [B, N, 1]`` summed."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale + log size) v`` for ``q, k, v [B, H, N, d]`` and ``size [B, N, 1]``."""
    bias = None if size is None else size.log().transpose(1, 2)[:, None]  # [B, 1, 1, N]: per key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class _State:
    def __init__(self, r: int):
        self.r, self.size = r, None


class _Parts:
    """The pieces of a pre-norm ViT block that ToMe and EViT run, under one set of names: transformers'
    ``Dinov2Layer`` (with layer scales) or ``CLIPEncoderLayer`` (CLIP's vision blocks)."""

    def __init__(self, blk: nn.Module):
        ident = lambda x: x  # noqa: E731
        if hasattr(blk, "attention") and hasattr(blk.attention, "q_proj"):  # Dinov2Layer
            att = blk.attention
            self.norm1, self.norm2, self.mlp = blk.norm1, blk.norm2, blk.mlp
            self.out, self.scale, self.head_dim = att.o_proj, att.scaling, att.head_dim
            self.ls1, self.ls2, self.drop = blk.layer_scale1, blk.layer_scale2, blk.drop_path
        elif hasattr(blk, "self_attn") and hasattr(blk, "layer_norm1"):  # CLIPEncoderLayer
            att = blk.self_attn
            self.norm1, self.norm2, self.mlp = blk.layer_norm1, blk.layer_norm2, blk.mlp
            self.out, self.scale, self.head_dim = att.out_proj, att.scale, att.head_dim
            self.ls1 = self.ls2 = self.drop = ident
        else:
            raise LeanfmError(f"ToMe does not know the block {type(blk).__name__}")
        self.qkv = (att.q_proj, att.k_proj, att.v_proj)

    def attend(self, hidden_states: torch.Tensor, size: torch.Tensor | None = None):
        """The block's attention half with its residual, ``(x, q, k)`` (``q, k [B, H, N, d]``);
        ``size`` weights the keys (proportional attention), None for plain attention."""
        b, n, _ = hidden_states.shape
        h = self.norm1(hidden_states)
        q, k, v = (proj(h).view(b, n, -1, self.head_dim).transpose(1, 2) for proj in self.qkv)
        a = proportional_attention(q, k, v, size, self.scale)
        return hidden_states + self.drop(self.ls1(self.out(a.transpose(1, 2).reshape(b, n, -1)))), q, k

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's MLP half with its residual."""
        return x + self.drop(self.ls2(self.mlp(self.norm2(x))))


class ToMeLayer(nn.Module):
    """A ViT block that merges ``state.r`` tokens after its attention (the same weights)."""

    def __init__(self, layer: nn.Module, state: _State):
        super().__init__()
        self.layer, self.state = layer, state
        self._parts = _Parts(layer)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        p = self._parts
        b, n, _ = hidden_states.shape
        if self.state.size is not None and self.state.size.shape[:2] != (b, n):
            self.state.size = None  # a new input: every token stands for one patch
        x, _, k = p.attend(hidden_states, self.state.size)  # no bias while all sizes are 1
        if self.state.r > 0:
            merge = bipartite_soft_matching(k.mean(dim=1), self.state.r)  # metric: keys averaged over heads
            size = self.state.size if self.state.size is not None else x.new_ones(b, n, 1)
            x, self.state.size = merge_by_size(merge, x, size)
        return p.feed_forward(x)


def vision_tower(model: nn.Module) -> nn.Module:
    """The image encoder of ``model``: itself (a ViT), or its ``vision_model`` (CLIP, a dual encoder)."""
    return getattr(model, "vision_model", model)


def _vit_layers(model: nn.Module):
    tower = vision_tower(model)
    enc = getattr(tower, "encoder", None)
    layers = getattr(enc, "layer", None)
    layers = getattr(enc, "layers", None) if layers is None else layers
    try:
        for blk in layers or [None]:
            _Parts(getattr(blk, "layer", blk))
    except LeanfmError:
        layers = None
    if not layers:
        raise LeanfmError(f"ToMe here applies to DINOv2 and CLIP vision transformers (transformers Dinov2Model, "
                          f"CLIPModel, a leanfm dual encoder), not {type(model).__name__}")
    return layers


def _vision_config(model: nn.Module):
    return vision_tower(model).config


def check_schedule(model: nn.Module, r: int, image_size: int | None = None) -> None:
    """One-line error unless merging ``r`` tokens per block fits ``model`` at ``image_size``
    (default: the model's configured size): the patch size divides the size, and every block
    has more than ``r`` token pairs left to match."""
    layers = _vit_layers(model)
    if r < 0:
        raise LeanfmError(f"ToMe r={r} must be >= 0")
    cfg = _vision_config(model)
    size = image_size or cfg.image_size
    if size % cfg.patch_size:
        raise LeanfmError(f"image size {size} is not a multiple of the patch size {cfg.patch_size}; "
                          f"use {size // cfg.patch_size * cfg.patch_size} or {(size // cfg.patch_size + 1) * cfg.patch_size}")
    n0 = 1 + (size // cfg.patch_size) ** 2
    for i, n in enumerate(merge_schedule(n0, len(layers), r)):
        if r > (n + 1) // 2 - 1:
            raise LeanfmError(f"ToMe r={r} merges more tokens than block {i} has left ({n} of {n0} tokens at "
                              f"{size}x{size}); use r <= {max_r(n0, len(layers))}")


def apply_tome(model: nn.Module, r: int, image_size: int | None = None) -> nn.Module:
    """Merge ``r`` tokens per block in a ViT (transformers ``Dinov2Model``, or the vision tower of a
    ``CLIPModel`` or leanfm dual encoder), in place; returns it.
    Fails with one line when ``r`` would merge more tokens than a block has left at
    ``image_size`` (default: the model's configured size); a forward on larger images than
    checked fails the same way."""
    check_schedule(model, r, image_size)
    layers = _vit_layers(model)
    state = _State(r)
    if any(type(blk).__name__ == "TokenPruneLayer" for blk in layers):
        raise LeanfmError("tome and token-prune cannot be combined on one model: apply one token-reducing step")
    for i, blk in enumerate(layers):
        layers[i] = ToMeLayer(blk.layer if isinstance(blk, ToMeLayer) else blk, state)
    vision_tower(model).register_forward_pre_hook(lambda mod, args, kwargs: setattr(state, "size", None), with_kwargs=True)
    model.leanfm_tome = state
    return model


def apply_tome_step(model: nn.Module, cfg, calib=None) -> dict:
    """The ``tome`` method's handler (``leanfm.apply_``): :func:`apply_tome` with the config's r
    and image size; records the tokens each block then runs on."""
    apply_tome(model, cfg.r, cfg.image_size)
    c = _vision_config(model)
    return {"simulated": False, "kernel": f"transformers {type(vision_tower(model)).__name__} blocks with ToMe merging "
                                          "(PyTorch eager)",
            "tokens_per_block": merge_schedule(1 + (cfg.image_size // c.patch_size) ** 2, c.num_hidden_layers, cfg.r)}


def max_r(tokens: int, blocks: int) -> int:
    """The largest r every one of ``blocks`` blocks can merge, starting from ``tokens``."""
    r = 0
    while True:
        n, ok = tokens, True
        for _ in range(blocks):
            if r + 1 > (n + 1) // 2 - 1:
                ok = False
                break
            n -= r + 1
        if not ok:
            return r
        r += 1
