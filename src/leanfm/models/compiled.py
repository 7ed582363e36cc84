"""A static KV cache and a compiled decode step: decoding without the Python tax (issue 18).

Eager decoding runs transformers' per-module Python and about fifty small aten ops per layer
(norms, rotary, cache concatenation, attention) at every token; on a 135M model that is about
a third of each step (docs/benchmarks.md). ``torch.compile`` traces the model's forward for one
input shape into a single graph: inductor fuses the elementwise ops into generated C++ loops on
a CPU, and on a GPU ``mode="reduce-overhead"`` also replays the step as a CUDA graph.

A traced graph needs shapes that do not change from step to step, so the KV cache is
transformers' ``StaticCache``: ``[batch, kv_heads, max_len, head_dim]`` per layer, allocated once
and written in place at a position counter; attention reads all ``max_len`` positions under a
causal mask. That is the price of static shapes (attention over the whole buffer), small next
to the weights at decode lengths of a few hundred tokens, and the reason ``max_len`` should be
the prompt plus the tokens to generate, not more.

The prompt is prefilled eagerly into the same cache (one forward per prompt: its Python cost is
paid once per sequence, and a prompt-length graph would compile once per prompt length). Each
distinct number of tokens fed per call (1 for plain decoding, ``k + 1`` for a speculative
verify) is its own graph; the first call of each is the compilation, timed apart
(``compile_seconds``), so timed steps never include it.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..errors import LeanfmError


RECOMPILE_LIMIT = 64  # compiled graphs per forward code object in one process


def compile_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode on the compiled path (None when it can): a KV-cache policy
    evicts from a dynamic cache, so it runs eagerly (decoding policies bring their own compiled
    steppers, or say why not: ``policy.compiled``)."""
    if getattr(model, "leanfm_kv_policy", None) is not None:
        return f"the KV-cache policy {getattr(model.leanfm_kv_policy, 'method', 'attached')} evicts from a dynamic cache"
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        return "not a transformers causal LM"
    return None


class StaticDecoder:
    """Batch decoding of ``model`` with a ``StaticCache`` of ``max_len`` positions and a compiled step.

    ``prefill(ids)`` runs the prompt eagerly; ``step(ids)`` feeds ``[B, n]`` more tokens through the
    compiled forward; ``crop(keep)`` rolls the cache back to its first ``keep`` positions (stale
    entries beyond it are masked until they are overwritten); ``reset()`` empties it.
    ``compile=False`` keeps every step eager on the same static cache (a reference for tests).
    ``cache_config``: the config the cache is laid out for (default the model's).
    ``own_gemv``: on a CPU, the compiled graph's one-row fp32 matmuls run on leanfm's C++ GEMV
    (:mod:`..kernels.gemv_pass`) when it compiles here; False keeps aten's ``mm``.
    ``skip_guards``: once a step shape has compiled, later steps of that shape skip dynamo's
    full guard check (about 1.7 ms per step on SmolLM2-135M, 2 CPU threads: the guards walk every
    parameter) and run only the guards that told this process's compiled graphs apart
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``). That is sound here because a
    decoder's inputs never change kind between steps: the same model, the same cache tensors,
    one token shape per graph; every other graph of the same forward (another decoder, model or
    view) was told apart from this one by a guard that failed when it compiled, and that guard
    still runs. False checks every guard on every step."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True, mode: str | None = None, cache_config=None,
                 own_gemv: bool = True, skip_guards: bool = True):
        from transformers import StaticCache

        why = compile_blocker(model)
        if why:
            raise LeanfmError(f"cannot decode on the compiled path: {why}")
        if max_len < 2:
            raise LeanfmError(f"a static cache needs at least 2 positions (got {max_len})")
        self.model, self.max_len, self.compiled = model, int(max_len), compile
        # cache_config: a layer-skip view writes the full model's cache layout (methods/decoding/steppers.skip_view)
        self.cache = StaticCache(config=cache_config or model.config, max_cache_len=self.max_len)
        self.pos = 0
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs: one launch per step
        self.mode, self.skip_guards = mode, skip_guards
        self.gemv_pass = None
        if compile:
            from ..kernels import cpp_gemv
            from ..kernels.backends import decode_ops
            from ..kernels.gemv_pass import DecodeGraphPass

            rows = cpp_gemv.MAX_ROWS if own_gemv and self.device.type == "cpu" and not isinstance(cpp_gemv.load(), str) else 0
            self.gemv_pass = DecodeGraphPass(decode_ops(), rows)
            # mode and options are exclusive in torch.compile: CUDA graphs go by their own option
            opts = {"post_grad_custom_pre_pass": self.gemv_pass, **({"triton.cudagraphs": True} if mode == "reduce-overhead" else {})}
            self._fn = torch.compile(model.forward, fullgraph=True, dynamic=False, options=opts)
        else:
            self._fn = model.forward
        self._graphs: set[tuple] = set()
        self.compile_seconds = 0.0

    @property
    def path(self) -> str:
        if not self.compiled:
            return "eager (static KV cache)"
        gemv = ", one-row fp32 matmuls on leanfm's C++ GEMV" if self.gemv_pass is not None and self.gemv_pass.gemv_rows else ""
        return f"compiled (torch.compile inductor{', ' + self.mode if self.mode else ''}, static KV cache{gemv})"

    def crop(self, keep: int) -> None:
        if not 0 <= keep <= self.pos:
            raise ValueError(f"cannot crop a cache of {self.pos} positions to {keep}")
        for layer in self.cache.layers:
            if getattr(layer, "is_sliding", False) and keep not in (0, self.pos):
                raise LeanfmError("rolling back a sliding-window layer of a static cache is not supported")
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(keep)  # in place: the compiled graph holds its address
        self.pos = keep

    def reset(self) -> None:
        self.crop(0)

    def _positions(self, n: int) -> torch.Tensor:
        if self.pos + n > self.max_len:
            raise LeanfmError(f"the static cache holds {self.max_len} positions; {self.pos} are used and {n} more were fed")
        return torch.arange(self.pos, self.pos + n, device=self.device)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, last: int = 1) -> torch.Tensor:
        """Eager forward of ``ids [B, P]`` into the cache; the logits of the last ``last`` positions."""
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                         cache_position=self._positions(ids.shape[1]), logits_to_keep=last)
        self.pos += ids.shape[1]
        return out.logits

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, n]`` through the compiled forward; logits ``[B, n, V]``."""
        n = ids.shape[1]
        pos = self._positions(n)
        key = tuple(ids.shape)
        compiled_before = key in self._graphs
        t0 = None if compiled_before else time.perf_counter()
        stance = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
                  if compiled_before and self.compiled and self.skip_guards else contextlib.nullcontext())
        # Every decoder compiles the same code object (the model class's forward), so each model,
        # view and step length is one more entry against dynamo's per-code limit (default 8); past
        # it dynamo would run eagerly without a word, so the limit is raised and hitting it fails.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            try:
                with stance:
                    out = self._fn(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=pos, logits_to_keep=n)
            except RuntimeError as e:
                # An input of a kind no graph was compiled for (e.g. ids with other strides):
                # dynamo refuses before running anything, so this call compiles it, timed apart.
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                t0 = time.perf_counter()
                out = self._fn(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=pos, logits_to_keep=n)
        logits = out.logits
        if t0 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_seconds += time.perf_counter() - t0
            self._graphs.add(key)
        self.pos += n
        if self.mode == "reduce-overhead":
            logits = logits.clone()  # a CUDA graph overwrites its outputs on the next replay
        return logits

    def warm(self, prompt_ids: torch.Tensor, n: int = 1) -> float:
        """Compile the ``[B, n]`` step outside any timing (a prefill and one step, then a reset);
        returns the seconds it took. Raises a one-line error when the forward cannot be traced."""
        self.reset()
        logits = self.prefill(prompt_ids)
        nxt = logits[:, -1:].argmax(-1).expand(-1, n).contiguous()
        try:
            self.step(nxt)
        except LeanfmError:
            raise
        except Exception as e:  # dynamo / inductor: name the first line, keep the run
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise LeanfmError(f"torch.compile could not compile the decode step ({type(e).__name__}: {first})") from None
        finally:
            self.reset()
        return self.compile_seconds
