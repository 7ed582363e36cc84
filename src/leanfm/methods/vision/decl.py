"""Declarations of the vision-transformer techniques (torch-free): ToMe token merging and EViT
token pruning. Both say how many tokens each block runs on (``token_schedule``), which the
schedule checks, the handlers and the ViT predictor read."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ...space import Choice


def merge_schedule(tokens: int, blocks: int, r: int) -> list[int]:
    """The tokens each of ``blocks`` blocks runs on when each merges ``r`` (ToMe), starting from
    ``tokens`` (the class token and the patches)."""
    return [tokens - i * r for i in range(blocks)]


def prune_schedule(tokens: int, blocks: int, keep_rate: float, layers: tuple[int, ...], fuse: bool = True) -> list[int]:
    """The tokens each of ``blocks`` blocks runs on when the blocks in ``layers`` keep
    ``ceil(keep_rate * patches)`` of their patch tokens after attention (EViT), plus the class
    token and, with ``fuse``, one token fusing the dropped ones."""
    import math

    out, n = [], tokens
    for i in range(blocks):
        out.append(n)
        if i in layers:
            patches = n - 1
            keep = max(1, math.ceil(keep_rate * patches))
            n = 1 + keep + (1 if fuse and keep < patches else 0)
    return out


@dataclass
class ToMeConfig(BaseConfig):
    """ToMe token merging (Bolya et al., ICLR 2023): each block merges its ``r`` most similar tokens
    into others, so later blocks run on fewer tokens; nothing is trained.

    r: tokens merged per block (0 = the plain model). The merges must leave each block at least
    one token pair to match: at 224x224 with patch 14 (257 tokens, 12 blocks) r <= 20.
    image_size: the square input size the merge schedule is checked for (the vision protocol's
    224); a forward on larger images that would merge too many tokens fails the same way.
    """

    method = "tome"
    families = ("vit", "clip")
    handler = "leanfm.methods.vision.tome:apply_tome_step"
    produces = "token-reduction"
    search_space = {"r": Choice(4, 8, 12, 16)}

    r: int = 8
    image_size: int = 224

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 0:
            raise LeanfmError(f"tome r={self.r} must be an integer >= 0 (tokens merged per block)")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise LeanfmError(f"tome image_size={self.image_size} must be a positive integer (pixels per side)")

    def check_model(self, model) -> None:
        from .tome import check_schedule

        check_schedule(model, self.r, self.image_size)

    def token_schedule(self, tokens: int, blocks: int) -> list[int]:
        return merge_schedule(tokens, blocks, self.r)

    def effect(self, eff) -> None:
        eff.unmodelled.append("tome: the predictor does not price vision transformers yet")


@dataclass
class TokenPruneConfig(BaseConfig):
    """EViT token pruning (Liang et al., ICLR 2022, "Not All Patches are What You Need"): in the
    chosen blocks, after attention, keep the patch tokens the class token attends to most and fuse
    the rest into one token (their attention-weighted mean); later blocks run on fewer tokens.
    Nothing is trained.

    keep_rate: share of the patch tokens each pruning block keeps, in (0, 1].
    layers: the blocks (0-based) that prune, after their attention (EViT's DeiT-S setting: 3, 6, 9).
    fuse: keep the dropped tokens as one fused token (EViT) instead of discarding them.
    image_size: the square input size the schedule is checked for (the vision protocol's 224).
    """

    method = "token-prune"
    families = ("vit", "clip")
    handler = "leanfm.methods.vision.prune_tokens:apply_token_prune_step"
    produces = "token-reduction"
    search_space = {"keep_rate": Choice(0.5, 0.7, 0.9)}

    keep_rate: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: bool = True
    image_size: int = 224

    def validate(self) -> None:
        if isinstance(self.keep_rate, bool) or not isinstance(self.keep_rate, (int, float)) or not 0 < self.keep_rate <= 1:
            raise LeanfmError(f"token-prune keep_rate={self.keep_rate!r} must be in (0, 1] (share of patch tokens kept)")
        if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
            raise LeanfmError(f"token-prune layers={list(self.layers)!r} must be block indices >= 0, e.g. [3, 6, 9]")
        if not isinstance(self.fuse, bool):
            raise LeanfmError(f"token-prune fuse={self.fuse!r} must be true or false")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise LeanfmError(f"token-prune image_size={self.image_size} must be a positive integer (pixels per side)")

    def check_model(self, model) -> None:
        from .prune_tokens import check_prune

        check_prune(model, self)

    def token_schedule(self, tokens: int, blocks: int) -> list[int]:
        return prune_schedule(tokens, blocks, self.keep_rate, tuple(self.layers), self.fuse)

    def effect(self, eff) -> None:
        eff.unmodelled.append("token-prune: the LM predictor does not price vision transformers (leanfm predict "
                              "prices a ViT model per image)")
