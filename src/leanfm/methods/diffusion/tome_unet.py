"""ToMe for Stable Diffusion (Bolya & Hoffman, CVPR Workshops 2023, "Token Merging for Fast Stable Diffusion").

A diffusion UNet's output needs every token back, so ToMe here *merges* before a computation and
*unmerges* after it (paper § 3): the self-attention of each transformer block runs on ``N - r``
tokens, and each merged token's result is copied back to the tokens it absorbed.

Matching (§ 4.1, "2D stride"): the ``h x w`` token grid is cut into ``stride x stride`` cells;
one token per cell (drawn at random) is a *destination*, the rest are sources. Each source is
linked to its most similar destination (cosine of the tokens), and the ``r`` sources with the
most similar links are averaged into their destinations. :func:`grid_merge` returns that pair of
functions for one token set; :func:`apply_tome_unet` hooks them around ``attn1`` (the
self-attention) of every diffusers ``BasicTransformerBlock`` at a resolution the config allows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LeanfmError


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.expand(-1, -1, x.shape[-1]))


def grid_merge(metric: torch.Tensor, h: int, w: int, stride: int, r: int, generator: torch.Generator | None = None):
    """``(merge, unmerge)`` for tokens ``metric [B, h*w, C]`` laid out row-major on an ``h x w``
    grid: ``merge(x [B, N, D]) -> [B, N - r, D]`` averages ``r`` source tokens into their most
    similar destinations; ``unmerge(y [B, N - r, D]) -> [B, N, D]`` puts every merged token's
    value back at each position it stands for. ``generator`` None: the top-left token of each
    cell is its destination (else a random one)."""
    b, n, _ = metric.shape
    if n != h * w:
        raise LeanfmError(f"ToMe: {n} tokens do not form a {h}x{w} grid")
    hs, ws = h // stride, w // stride
    if r <= 0 or hs == 0 or ws == 0:
        ident = lambda x: x  # noqa: E731
        return ident, ident
    device = metric.device
    if generator is None:
        pick = torch.zeros(hs, ws, 1, dtype=torch.int64)
    else:
        pick = torch.randint(stride * stride, (hs, ws, 1), generator=generator)
    # -1 marks each cell's destination; tokens outside whole cells (h, w not multiples) are sources
    cells = torch.zeros(hs, ws, stride * stride, dtype=torch.int64).scatter_(2, pick, -1)
    cells = cells.view(hs, ws, stride, stride).transpose(1, 2).reshape(hs * stride, ws * stride)
    grid = torch.zeros(h, w, dtype=torch.int64)
    grid[: hs * stride, : ws * stride] = cells
    order = grid.reshape(1, n, 1).argsort(dim=1).to(device)  # destinations (-1) first
    n_dst = hs * ws
    a_idx, b_idx = order[:, n_dst:], order[:, :n_dst]  # sources, destinations: [1, *, 1]
    r = min(r, n - n_dst)
    with torch.no_grad():
        m = F.normalize(metric.float(), dim=-1)
        scores = _gather(m, a_idx.expand(b, -1, -1)) @ _gather(m, b_idx.expand(b, -1, -1)).transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)  # each source's best destination
        edge = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge[:, r:], edge[:, :r]  # kept sources, merged sources (into a_idx)
        dst_idx = node_idx[..., None].gather(1, src_idx)  # their destinations (into b_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        bx = x.shape[0]
        src, dst = _gather(x, a_idx.expand(bx, -1, -1)), _gather(x, b_idx.expand(bx, -1, -1))
        unm, moved = _gather(src, unm_idx), _gather(src, src_idx)
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, x.shape[-1]), moved, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        k, d = unm_idx.shape[1], y.shape[-1]
        unm, dst = y[:, :k], y[:, k:]
        src = _gather(dst, dst_idx)
        out = y.new_zeros(y.shape[0], n, d)
        out.scatter_(1, b_idx.expand(y.shape[0], -1, d), dst)
        out.scatter_(1, _gather(a_idx.expand(y.shape[0], -1, -1), unm_idx).expand(-1, -1, d), unm)
        out.scatter_(1, _gather(a_idx.expand(y.shape[0], -1, -1), src_idx).expand(-1, -1, d), src)
        return out

    return merge, unmerge


class _State:
    def __init__(self, ratio: float, max_downsample: int, stride: int, seed: int):
        self.ratio, self.max_downsample, self.stride, self.seed = ratio, max_downsample, stride, seed
        self.shape: tuple[int, int] | None = None  # the latent's H, W of the current call
        self.generator = torch.Generator()
        self.merged_calls = 0
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def grid(self, n: int) -> tuple[int, int] | None:
        """The token grid of a block with ``n`` tokens, or None where it is not to be merged."""
        hh, ww = self.shape
        ds = int(round(math.sqrt(hh * ww / n)))
        if ds > self.max_downsample:
            return None
        h, w = math.ceil(hh / ds), math.ceil(ww / ds)
        return (h, w) if h * w == n else None


def _hook_attention(attn: nn.Module, state: _State) -> None:
    pending: list = []

    def before(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if kwargs.get("encoder_hidden_states") is not None or x.dim() != 3 or state.shape is None:
            pending.append(None)
            return None
        grid = state.grid(x.shape[1])
        r = int(x.shape[1] * state.ratio)
        if grid is None or r == 0:
            pending.append(None)
            return None
        merge, unmerge = grid_merge(x, *grid, state.stride, r, state.generator)
        pending.append(unmerge)
        state.merged_calls += 1
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": merge(x)}
        return (merge(x), *args[1:]), kwargs

    def after(module, args, kwargs, output):
        unmerge = pending.pop()
        return output if unmerge is None else unmerge(output)

    attn.register_forward_pre_hook(before, with_kwargs=True)
    attn.register_forward_hook(after, with_kwargs=True)


def apply_tome_unet(unet: nn.Module, ratio: float, max_downsample: int = 1, stride: int = 2, seed: int = 0) -> _State:
    """Hook ToMe around the self-attention of every ``BasicTransformerBlock`` of a diffusers UNet
    (see the module doc); returns the shared state (``reset()`` it before each batch of samples)."""
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock" and hasattr(m, "attn1")]
    if not blocks:
        raise LeanfmError(f"tome-unet merges tokens in the transformer blocks (BasicTransformerBlock) of a diffusers UNet, "
                          f"as in Stable Diffusion; this {type(unet).__name__} has none")
    if hasattr(unet, "leanfm_tome"):
        raise LeanfmError("tome-unet is already applied to this UNet; use one tome-unet step")
    state = _State(ratio, max_downsample, stride, seed)

    def shape(module, args, kwargs):
        x = kwargs["sample"] if "sample" in kwargs else args[0]
        state.shape = tuple(x.shape[-2:])

    unet.register_forward_pre_hook(shape, with_kwargs=True)
    for blk in blocks:
        _hook_attention(blk.attn1, state)
    unet.leanfm_tome = state
    return state
