"""llama.cpp (through llama-cpp-python's C bindings) as a measurement runtime for a GGUF file.

The session talks to libllama directly: one ``llama_decode`` per prefill (the whole prompt in
one batch) and per decode step, greedy argmax over the last logits in numpy. Nothing of
llama-cpp-python's high-level ``Llama`` class (sampling chain, token bookkeeping) sits in the
timed loop. :meth:`LlamaCppSession.perf` returns llama.cpp's own timers (``llama_perf_context``,
the numbers llama-cli prints), so a benchmark can show what leanfm's loop adds on top.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LeanfmError
from .base import RuntimeSession

INSTALL = "pip install 'leanfm[llamacpp]'  (compiles llama.cpp from source: about 8-15 minutes on 2 cores)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LeanfmError(f"llama.cpp is not installed; install it with: {INSTALL}") from None
    return llama_cpp


_QUIET = None  # the log callback must outlive every session


def _silence(L) -> None:
    global _QUIET
    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCppSession(RuntimeSession):
    """A GGUF file in llama.cpp: ``n_ctx`` positions, ``threads`` threads for prefill and decode."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, threads: int, n_ctx: int):
        super().__init__(path, threads, n_ctx)
        L = self.L = import_llama_cpp()
        _silence(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise LeanfmError(f"llama.cpp could not load {self.path}; is it a GGUF file of an architecture llama.cpp knows?")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx  # a whole window in one llama_decode call (split into micro-batches inside)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise LeanfmError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path}; lower --seqlen")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        self.pos = 0

    def _decode(self, ids: Sequence[int], start: int, all_logits: bool) -> int:
        n = len(ids)
        if start + n > self.n_ctx:
            raise LeanfmError(f"{start + n} positions exceed the llama.cpp context of {self.n_ctx}")
        b = self.batch
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(t), start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise LeanfmError(f"llama_decode failed with code {rc} on {self.path}")
        self.pos = start + n
        return n if all_logits else 1

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.pos = 0

    def _last_argmax(self) -> int:
        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(row.argmax())

    def window_logits(self, ids: Sequence[int]) -> np.ndarray:
        self._clear()
        n = self._decode(ids, 0, all_logits=True)
        out = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()
        self._clear()
        return out

    def prefill(self, ids: Sequence[int]) -> int:
        self._clear()
        self._decode(ids, 0, all_logits=False)
        return self._last_argmax()

    def step(self, token: int) -> int:
        self._decode([token], self.pos, all_logits=False)
        return self._last_argmax()

    def decode_weight_bytes(self) -> int:
        return gguf_decode_bytes(self.path)

    def kv_cache_bytes(self, positions: int) -> int:
        """K and V of every layer for ``positions`` tokens, in the context's cache type (f16 by default)."""
        import gguf

        fields = gguf.GGUFReader(str(self.path)).fields
        arch = fields["general.architecture"].contents()
        L = self.L
        n_layer, n_embd, n_head = L.llama_model_n_layer(self.model), L.llama_model_n_embd(self.model), L.llama_model_n_head(self.model)
        n_kv = L.llama_model_n_head_kv(self.model)
        key = fields.get(f"{arch}.attention.key_length")
        head_dim = int(key.contents()) if key is not None else n_embd // n_head
        return 2 * n_layer * n_kv * head_dim * positions * 2

    def perf(self, reset: bool = False) -> dict:
        """llama.cpp's own timers since the last reset: prompt and decode milliseconds and token counts."""
        d = self.L.llama_perf_context(self.ctx)
        out = {"prompt_ms": d.t_p_eval_ms, "prompt_tokens": d.n_p_eval, "decode_ms": d.t_eval_ms, "decode_tokens": d.n_eval}
        if reset:
            self.L.llama_perf_context_reset(self.ctx)
        return out

    def version(self) -> str:
        return f"llama-cpp-python {self.L.__version__}"

    def build(self) -> dict:
        info = self.L.llama_print_system_info().decode(errors="replace")
        flags = {}
        for part in info.replace("CPU :", "").split("|"):
            k, _, v = part.partition("=")
            if k.strip() and v.strip():
                flags[k.strip()] = v.strip()
        return {"system_info": " ".join(info.split()), "cpu_flags": [k for k, v in flags.items() if v == "1"]}

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None


def gguf_decode_bytes(path: str | Path) -> int:
    """Bytes of the tensors a decode step reads from a GGUF: all of them, except the token
    embedding when a separate output head exists (the lookup reads one row of it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    return total - tensors.get("token_embd.weight", 0) if "output.weight" in tensors else total
