"""Seeded calibration sampler: ``n`` random windows of ``seqlen`` tokens from a corpus.

As in the GPTQ reference code, the corpus is tokenized once and window starts are drawn
uniformly; here the draw uses its own ``torch.Generator`` so global RNG state is untouched.
"""
from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import LeanfmError
from .text import check_dataset, load_text


@dataclass
class Calibration:
    """A calibration request; ``tokens(tokenizer)`` materializes the ``[n, seqlen]`` ids."""

    dataset: str = "gensim-wiki"
    n: int = 128
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    sizing: str = ""  # why this size (e.g. "scaled to --max-eval-tokens 4096"), recorded with the run
    _cache: dict = field(default_factory=dict, repr=False)

    def describe(self) -> dict:
        d = {"dataset": self.dataset, "n": self.n, "seqlen": self.seqlen, "seed": self.seed}
        return {**d, "sizing": self.sizing} if self.sizing else d

    def check(self) -> None:
        """Fail now, in one line, when the calibration text cannot be read (cheap: nothing is
        tokenized); see :func:`leanfm.data.text.check_dataset`."""
        check_dataset(self.dataset, "test", self.data_dir, flag="--calib-dataset")

    def tokens(self, tokenizer) -> torch.Tensor:
        key = (getattr(tokenizer, "name_or_path", id(tokenizer)), self.dataset, self.n, self.seqlen, self.seed, self.data_dir)
        if key not in self._cache:
            self._cache[key] = sample_windows(
                encode(tokenizer, load_text(self.dataset, "test", self.data_dir)), self.n, self.seqlen, self.seed, self.dataset
            )
        return self._cache[key]


def calibration(dataset: str = "gensim-wiki", n: int = 128, seqlen: int = 2048, seed: int = 0, data_dir: str | None = None) -> Calibration:
    for what, v in (("n", n), ("seqlen", seqlen), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise LeanfmError(f"calibration {what} must be a whole number, got {v!r}")
    if not isinstance(dataset, (str, os.PathLike)):
        raise LeanfmError(f"calibration dataset must be a name (wikitext2, gensim-wiki) or a text file path, got {dataset!r}")
    if n < 1 or seqlen < 2:
        raise LeanfmError(f"calibration needs n >= 1 samples of seqlen >= 2 tokens (got n={n}, seqlen={seqlen})")
    return Calibration(str(dataset), int(n), int(seqlen), int(seed), data_dir)


CHUNK_CHARS = 1 << 18


def _cut(text: str, start: int, end: int) -> int:
    """The last position in ``(start, end]`` where a non-space character is followed by a space;
    ``end`` when there is none in the last 4096 characters."""
    lo = max(start + 1, end - 4096)
    cuts = [m.start() + 1 for m in re.finditer(r"\S\s", text[lo - 1 : end])]
    return lo - 1 + cuts[-1] if cuts else end


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _splits_cleanly(tokenizer, text: str, cut: int, span: int = 2048) -> bool:
    """Whether tokenizing both sides of ``cut`` apart gives the ids of tokenizing them together
    (true for byte-level BPE at a word's start; false for tokenizers that prefix each call)."""
    a, b = text[max(0, cut - span) : cut], text[cut : cut + span]
    return _ids(tokenizer, a) + _ids(tokenizer, b) == _ids(tokenizer, a + b)


def encode(tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """Tokenize a whole corpus once, without special tokens (the protocol adds BOS itself).

    Long texts go through the tokenizer in pieces of about ``chunk_chars`` characters, each cut
    where a word starts after a space: the fast tokenizer keeps offsets and token strings for
    its whole input, about 0.4 GB for the 0.7M tokens of gensim-wiki, which the process keeps
    as its peak (MeZO's budget is 1.2x of inference). The pieces give the same ids as the whole
    text; a tokenizer for which the first cut does not (one that prefixes every call) gets the
    whole text at once."""
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than max length": we window it
    try:
        first = _cut(text, 0, chunk_chars) if len(text) > chunk_chars else len(text)
        if first >= len(text) or not _splits_cleanly(tokenizer, text, first):
            return torch.tensor(_ids(tokenizer, text), dtype=torch.long)
        parts, i = [], 0
        while i < len(text):
            j = _cut(text, i, i + chunk_chars) if i + chunk_chars < len(text) else len(text)
            parts.append(torch.tensor(_ids(tokenizer, text[i:j]), dtype=torch.long))
            i = j
    finally:
        hf_logging.set_verbosity(prev)
    return torch.cat(parts)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, name: str = "corpus") -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise LeanfmError(f"calibration corpus {name} has only {ids.numel()} tokens, fewer than one window of {seqlen} (it needs more than {seqlen}); "
                          "use a larger corpus or a smaller --calib-seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
