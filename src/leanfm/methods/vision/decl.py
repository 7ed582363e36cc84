"""Declarations of the vision-transformer techniques (torch-free): ToMe token merging."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError


def merge_schedule(tokens: int, blocks: int, r: int) -> list[int]:
    """The tokens each of ``blocks`` blocks runs on when each merges ``r`` (ToMe), starting from
    ``tokens`` (the class token and the patches)."""
    return [tokens - i * r for i in range(blocks)]


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

    def effect(self, eff) -> None:
        eff.unmodelled.append("tome: the predictor does not price vision transformers yet")
