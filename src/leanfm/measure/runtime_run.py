"""Measuring a model file inside another runtime (llama.cpp, ONNX Runtime, ...), same schema.

leanfm drives the runtime's session (:class:`leanfm.runtimes.base.RuntimeSession`) and times
each call on the wall clock; the forward passes, the KV cache and the kernels are the runtime's.

- quality: perplexity and fidelity from the runtime's own logits on the protocol's windows
  (:func:`.quality.evaluate`, each window from a fresh context);
- speed: one repeat = a prefill of the prompt (the runtime returns the first new token) then
  ``gen`` single-token decode steps, each timed, greedy; medians and spread as for torch
  (:class:`RuntimeTimer`, drop-in for :class:`.speed.DecodeTimer`, so repeats interleave);
- memory: the file's size is ``weight_bytes`` and ``model_size_on_disk_bytes``; ``peak_rss_bytes``
  is the process's peak during the runtime's decode (this Python process, torch included);
  ``kv_cache_bytes`` is the runtime's K/V cache for ``prompt + gen`` positions as the session
  reports it.
Batch is 1: the sessions run one sequence.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..errors import LeanfmError
from .cpuload import CpuLoad
from .stats import percentile


def check_runtime_protocol(protocol, runtime: str) -> None:
    if protocol.batch != 1:
        raise LeanfmError(f"--runtime {runtime} measures one sequence at a time; use --batch 1")


class RuntimeTimer:
    """Prefill + ``gen`` decode steps in a runtime session, one repeat per :meth:`repeat` call."""

    def __init__(self, session, prompt_ids: torch.Tensor, gen: int, meter=None):
        if prompt_ids.shape[0] != 1:
            raise LeanfmError(f"--runtime {session.name} measures one sequence at a time; use --batch 1")
        self.session, self.prompt, self.gen, self.meter = session, prompt_ids[0].tolist(), gen, meter
        self.prefills, self.tps, self.decodes, self.others, self.selfs, self.all_steps = [], [], [], [], [], []
        self.tokens: list[int] = []
        self.runtime_perf: list[dict] = []

    @property
    def label(self) -> str:
        return f"prefill + decode in {self.session.name}"

    def repeat(self, record: bool = True) -> None:
        s = self.session
        if record and self.meter is not None:
            self.meter.begin()
        perf = getattr(s, "perf", None)
        if perf:
            perf(reset=True)
        with CpuLoad() as load:
            t0 = time.perf_counter()
            nxt = s.prefill(self.prompt)
            prefill = time.perf_counter() - t0
            toks, steps = [nxt], []
            for _ in range(self.gen):
                t0 = time.perf_counter()
                nxt = s.step(nxt)
                steps.append(time.perf_counter() - t0)
                toks.append(nxt)
        if not record:
            return
        self.tokens = toks
        decode_s = sum(steps)
        self.prefills.append(prefill * 1e3)
        self.tps.append(self.gen / decode_s)
        self.decodes.append(decode_s)
        self.all_steps.extend(x * 1e3 for x in steps)
        self.others.append(load.other_busy_cores)
        self.selfs.append(load.self_busy_cores)
        if perf:
            self.runtime_perf.append(perf())
        if self.meter is not None:
            self.meter.add(decode_s, self.gen)

    def result(self) -> dict:
        if not self.tps:
            raise ValueError("no recorded repeat")
        metrics = {
            "prefill_ms": statistics.median(self.prefills),
            "tpot_ms_p50": percentile(self.all_steps, 0.5),
            "tpot_ms_p90": percentile(self.all_steps, 0.9),
            "decode_tokens_per_s": statistics.median(self.tps),
        }
        details = {
            "prefill_ms_min": min(self.prefills), "prefill_ms_max": max(self.prefills),
            "decode_tokens_per_s_min": min(self.tps), "decode_tokens_per_s_max": max(self.tps),
            "decode_tokens_per_s_repeats": [round(x, 3) for x in self.tps],
            "decode_seconds_total": sum(self.decodes), "decode_tokens_total": self.gen * len(self.tps),
            "cpu_other_busy_cores_repeats": self.others, "cpu_self_busy_cores_repeats": self.selfs,
            "speed_loop": f"leanfm's timer around {self.session.name}'s prefill and single-token decode calls (greedy)",
        }
        if self.runtime_perf:  # the runtime's own timers over the same calls: what leanfm's loop adds
            own = [p["decode_tokens"] / (p["decode_ms"] / 1e3) for p in self.runtime_perf if p.get("decode_ms")]
            if own:
                details["runtime_own_decode_tokens_per_s"] = statistics.median(own)
        return {"metrics": metrics, "details": details, "cache": None}


def measure_untimed(session, model, tok, protocol, ids: torch.Tensor, reference=None) -> dict:
    """Memory and quality groups of ``protocol`` inside ``session`` (``model``: the torch model the
    file was exported from, for its BOS rule). Returns ``{"metrics", "details"}``."""
    from . import memory as mem
    from .run import quality_group, speed_prompt

    metrics, details = {}, {"runtime": session.info()}
    groups = set(protocol.groups)
    if "memory" in groups:
        size = session.path.stat().st_size
        metrics.update(weight_bytes=size, model_size_on_disk_bytes=size)
        kv = session.kv_cache_bytes(protocol.prompt + protocol.gen)
        if kv is not None:
            metrics["kv_cache_bytes"] = kv
        with mem.PeakRSS() as peak:
            RuntimeTimer(session, speed_prompt(ids, protocol), protocol.gen).repeat(record=False)
        metrics["peak_rss_bytes"] = peak.bytes
        details["peak_rss_scope"] = f"{peak.scope} (this process: leanfm's Python and torch plus {session.name} holding the file)"
    if "quality" in groups:
        q, d = quality_group(session, model, tok, protocol, ids, reference)
        details.update(d, quality_logits=f"{session.name}'s own logits, one fresh context per window")
        metrics.update(q)
    return {"metrics": metrics, "details": details}
