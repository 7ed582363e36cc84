"""Prefill and decode timing with the KV cache (greedy), after warm-up, over repeats.

One repeat: a prefill forward over ``[batch, prompt]`` ids (timed as ``prefill_ms``; it yields
the first new token, the LM head computed for the last position only, as ``generate`` does), then ``gen`` single-token decode steps, each timed (time per output token).
The cache holds ``prompt + gen`` positions at the end (fewer under an evicting KV-cache policy
attached to the model, whose cache is used from the prefill on). Reported: medians over the recorded
repeats and the spread (min/max), so a noisy machine shows up in the numbers.

With a decoding policy attached (``model.leanfm_decoder``: speculative, prompt lookup, early
exit), the decode part of each repeat runs *through the policy* (:func:`..decoding.policy_repeat`):
decode time = the policy's whole generation minus the repeat's prefill; time per output token is
that over the tokens it emitted (a policy emits several per forward, so ``tpot_ms_p50/p90`` are
over the repeats' means, not single steps); the policy's own metrics (``acceptance_rate``,
``mean_accepted_tokens``, ``mean_layers_used``, ...) come with them. ``kv_cache_bytes`` is then the
target model's cache after one untimed plain decode of the same length.

:class:`DecodeTimer` runs one repeat at a time, so ``leanfm bench`` can interleave the repeats of
all recipes of an invocation (A B C A B C ...) and a busy machine hits them alike; each repeat
also records how many cores other processes kept busy meanwhile (:mod:`.cpuload`).
"""
from __future__ import annotations

import statistics
import time

import torch

from .. import progress
from .cpuload import CpuLoad
from .stats import percentile


def sync_device() -> None:
    """Wait for queued GPU work, so a timer reads finished work (nothing to do on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _one_repeat(model, prompt_ids: torch.Tensor, gen: int):
    sync_device()
    t0 = time.perf_counter()
    kw = {}
    if getattr(model, "leanfm_kv_policy", None) is not None:  # a KV-cache policy (StreamingLLM, H2O, ...)
        from ..methods.kvcache.policies import make_cache

        kw["past_key_values"] = make_cache(model)
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **kw)  # LM head on the last position, as generate
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync_device()
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    steps = []
    for _ in range(gen):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync_device()
        steps.append(time.perf_counter() - t0)
        cache = out.past_key_values
    return prefill, steps, cache


@torch.no_grad()
def _static_repeat(dec, prompt_ids: torch.Tensor, gen: int):
    """:func:`_one_repeat` on a :class:`..models.compiled.StaticDecoder`: eager prefill into the
    static cache, then ``gen`` compiled single-token steps."""
    dec.reset()
    sync_device()
    t0 = time.perf_counter()
    nxt = dec.prefill(prompt_ids)[:, -1].argmax(-1, keepdim=True)
    sync_device()
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(gen):
        t0 = time.perf_counter()
        nxt = dec.step(nxt)[:, -1].argmax(-1, keepdim=True)
        sync_device()
        steps.append(time.perf_counter() - t0)
    return prefill, steps, dec.cache


class DecodeTimer:
    """Prefill + ``gen`` decode steps of one model, one repeat per :meth:`repeat` call.

    ``meter``: an energy meter (``begin()`` / ``add(seconds, tokens)``) charged with each recorded
    repeat. With a decoding policy attached (``model.leanfm_decoder``) the decode runs through it.
    ``compile``: decode on a static KV cache with a compiled step (:mod:`..models.compiled`),
    compiled here, before any repeat; a model the compiled path cannot run (a KV-cache or
    decoding policy, a forward torch.compile cannot trace) decodes eagerly and the result says why.
    ``own_gemv``: the compiled step's one-row fp32 matmuls run on leanfm's C++ GEMV (False: aten's).
    """

    def __init__(self, model, prompt_ids: torch.Tensor, gen: int, meter=None, compile: bool = False, own_gemv: bool = True):
        self.model, self.gen, self.meter, self.own_gemv = model, gen, meter, own_gemv
        self.prompt_ids = prompt_ids.to(getattr(model, "device", prompt_ids.device))
        self.policy = getattr(model, "leanfm_decoder", None)
        if self.policy is not None:
            from .decoding import check_policy_batch

            check_policy_batch(self.policy, prompt_ids.shape[0])
        self.static, self.fallback, self.policy_generate, self.decoders = None, None, None, []
        if compile:
            self._compile()
        self.prefills, self.tps, self.tpots, self.decodes, self.stats, self.others, self.selfs = [], [], [], [], [], [], []
        self.all_steps: list[float] = []
        self.cache = None
        self.repeats_run = 0

    def _compile(self) -> None:
        from ..errors import LeanfmError
        from ..models.compiled import StaticDecoder, compile_blocker

        max_len = self.prompt_ids.shape[1] + self.gen
        why = compile_blocker(self.model)
        if why is None and self.policy is not None and not hasattr(self.policy, "compiled"):
            why = f"the decoding policy {self.policy.name} has no compiled path"
        if why is None:
            try:
                with progress.bar("compiling the decode step (torch.compile)", None):
                    if self.policy is None:
                        dec = StaticDecoder(self.model, max_len, own_gemv=self.own_gemv)
                        dec.warm(self.prompt_ids)
                        self.static, self.decoders = dec, [dec]
                    else:  # one unrecorded generation compiles every step length it feeds
                        from .decoding import policy_repeat

                        self.policy_generate, steppers = self.policy.compiled(self.model, max_len)
                        self.decoders = [s.dec for s in steppers]
                        policy_repeat(self.model, self.policy, self.prompt_ids, self.gen, seed=0, generate=self.policy_generate)
            except LeanfmError as e:
                why, self.static, self.policy_generate, self.decoders = str(e), None, None, []
        if why is not None:
            self.fallback = why
            progress.info(f"decoding eagerly: {why}")

    def compile_seconds(self) -> float:
        return sum(d.compile_seconds for d in self.decoders)

    @property
    def path(self) -> str:
        return self.decoders[0].path if self.decoders else "eager (dynamic KV cache)"

    @property
    def label(self) -> str:
        return "prefill + decode" + (f" through {self.policy.name}" if self.policy is not None else "") + (
            ", compiled" if self.decoders else "")

    def repeat(self, record: bool = True) -> None:
        """One repeat; kept in the statistics when ``record`` (else a warm-up)."""
        if record and self.meter is not None:
            self.meter.begin()
        with CpuLoad() as load:
            if self.static is not None:
                prefill, steps, self.cache = _static_repeat(self.static, self.prompt_ids, self.gen)
                decode_s, new = sum(steps), self.prompt_ids.shape[0] * self.gen
            elif self.policy is None:
                prefill, steps, self.cache = _one_repeat(self.model, self.prompt_ids, self.gen)
                decode_s, new = sum(steps), self.prompt_ids.shape[0] * self.gen
            else:
                from .decoding import policy_repeat

                before = self.compile_seconds()
                prefill, decode_s, new, st = policy_repeat(self.model, self.policy, self.prompt_ids, self.gen, seed=self.repeats_run,
                                                           generate=self.policy_generate)
                if self.compile_seconds() > before:  # a step length the warm-up did not feed (sampling): say so
                    st = {**st, "compiled_during_repeat_s": self.compile_seconds() - before}
        self.repeats_run += 1
        if not record:
            return
        self.prefills.append(prefill * 1e3)
        self.tps.append(new / decode_s)
        self.decodes.append(decode_s)
        self.others.append(load.other_busy_cores)
        self.selfs.append(load.self_busy_cores)
        if self.policy is None:
            self.all_steps.extend(x * 1e3 for x in steps)
        else:
            self.tpots.append(decode_s * 1e3 / new)
            self.stats.append(st)
        if self.meter is not None:
            self.meter.add(decode_s, new)

    def result(self) -> dict:
        """Medians over the recorded repeats, the spread, the per-repeat CPU load, and the cache at
        P + G (for a policy: from one untimed plain decode)."""
        if not self.tps:
            raise ValueError("no recorded repeat")
        if self.policy is not None and self.cache is None:
            self.cache = _one_repeat(self.model, self.prompt_ids, self.gen)[2]
        steps = self.all_steps if self.policy is None else self.tpots
        metrics = {
            "prefill_ms": statistics.median(self.prefills),
            "tpot_ms_p50": percentile(steps, 0.5),
            "tpot_ms_p90": percentile(steps, 0.9),
            "decode_tokens_per_s": statistics.median(self.tps),
        }
        details = {
            "prefill_ms_min": min(self.prefills), "prefill_ms_max": max(self.prefills),
            "decode_tokens_per_s_min": min(self.tps), "decode_tokens_per_s_max": max(self.tps),
            "decode_tokens_per_s_repeats": [round(x, 3) for x in self.tps],
            "decode_seconds_total": sum(self.decodes),
            "decode_tokens_total": (sum(s["new_tokens"] for s in self.stats) if self.policy is not None
                                    else self.prompt_ids.shape[0] * self.gen * len(self.tps)),
            "cpu_other_busy_cores_repeats": self.others, "cpu_self_busy_cores_repeats": self.selfs,
            "decode_path": self.path,
        }
        if self.decoders:
            metrics["compile_seconds"] = self.compile_seconds()
        if self.fallback is not None:
            details["compile_fallback"] = self.fallback
        if self.policy is not None:
            metrics.update(self.policy.metrics(self.stats))
            details.update(decoding_policy=self.policy.name, decoding_policy_stats=self.stats,
                           tpot_scope="per-repeat mean (the policy emits several tokens per forward)")
        return {"metrics": metrics, "details": details, "cache": self.cache}


def decode_benchmark(model, prompt_ids: torch.Tensor, gen: int, repeats: int, warmup: int, meter=None,
                     compile: bool = False) -> dict:
    """Time prefill + ``gen`` decode steps, ``warmup`` unrecorded then ``repeats`` recorded repeats
    in a row (through the model's decoding policy when one is attached; on the compiled path with
    ``compile``); ``meter`` (an energy meter) is charged with each recorded repeat."""
    timer = DecodeTimer(model, prompt_ids, gen, meter, compile=compile)
    with progress.bar(f"speed ({timer.label})", warmup + repeats) as adv:
        for r in range(warmup + repeats):
            timer.repeat(record=r >= warmup)
            adv()
    return timer.result()
