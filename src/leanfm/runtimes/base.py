"""What leanfm needs from an inference runtime to measure a model file inside it.

A session holds one model file loaded in one runtime (llama.cpp, ONNX Runtime, ...). leanfm's
measurement code drives it through three calls and times them itself; the forward passes, the
KV cache and the kernels are the runtime's own:

- :meth:`RuntimeSession.window_logits` — logits at every position of one window, from a fresh
  context (perplexity and fidelity on the protocol's windows);
- :meth:`RuntimeSession.prefill` — reset the context, run the prompt, return the greedy next token;
- :meth:`RuntimeSession.step` — feed one token, return the greedy next token (decode).

``info()`` says which runtime ran: its name, version and build flags, the file and its size.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np


class RuntimeSession(ABC):
    """One model file loaded in one runtime; single sequence (batch 1), greedy."""

    name: str = "?"

    def __init__(self, path: str | Path, threads: int, n_ctx: int):
        self.path, self.threads, self.n_ctx = Path(path), threads, n_ctx

    @abstractmethod
    def window_logits(self, ids: Sequence[int]) -> np.ndarray:
        """``[len(ids), vocab]`` float32 logits, position i predicting token i+1; fresh context."""

    @abstractmethod
    def prefill(self, ids: Sequence[int]) -> int:
        """Clear the context, run ``ids`` as the prompt, return the argmax next token."""

    @abstractmethod
    def step(self, token: int) -> int:
        """Append ``token`` to the context, return the argmax next token."""

    @abstractmethod
    def version(self) -> str:
        """The runtime's version string."""

    def build(self) -> dict:
        """Build/ISA flags of the runtime (what it was compiled with, which kernels it may use)."""
        return {}

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (default: the whole file)."""
        return self.path.stat().st_size

    def kv_cache_bytes(self, positions: int) -> int | None:
        """The runtime's K/V cache for ``positions`` tokens (None when it cannot tell)."""
        return None

    def info(self) -> dict:
        return {"runtime": self.name, "runtime_version": self.version(), "runtime_build": self.build(),
                "file": str(self.path), "file_bytes": self.path.stat().st_size, "threads": self.threads}

    def close(self) -> None:
        """Free the runtime's memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
