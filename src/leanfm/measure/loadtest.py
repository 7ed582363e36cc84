"""Load tests of an OpenAI-compatible completions endpoint: Poisson arrivals, streaming client.

What it measures is what vLLM's ``bench serve`` reports, on any server that speaks the OpenAI
``/v1/completions`` streaming protocol (transformers' ``serve``, llama-cpp-python's server,
vLLM):

- Arrivals: request ``i`` is sent at the sum of ``i`` gaps drawn from a gamma distribution with
  shape ``burstiness`` and mean ``1 / rate`` (burstiness 1 = a Poisson process; below 1 burstier,
  above 1 more regular), seeded; ``max_concurrency`` caps requests in flight (later arrivals wait
  for a slot; as in vLLM's ``bench serve`` their latencies run from the send, after the wait).
- Each request streams (``stream: true``); ``ttft`` = send → first chunk carrying text (when no
  chunk carries text but the server reports output tokens, the first chunk: they arrived at once);
  ``itl`` = gaps between text chunks; ``tpot`` = (end − first text) / (output tokens − 1);
  ``e2e`` = send → end of stream. Output tokens are the server's ``usage.completion_tokens`` when
  it reports them, else the text chunks counted.
- Throughput over the run's span (first send → last completion): requests/s, output tokens/s.
  Goodput: requests/s of requests that completed and met every SLO bound (``ttft``, ``tpot``,
  ``e2e``, ``itl`` as given).
- Bounded: at most ``num_requests`` requests and ``duration`` seconds of arrivals; requests still
  running ``drain`` seconds after the last arrival are cancelled and counted as failed.
Only loopback endpoints are accepted: a load test is aimed at a server on this machine.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from ..errors import LeanfmError
from .stats import percentile

SLO_KEYS = ("ttft", "tpot", "itl", "e2e")
_UNITS = {"ms": 1.0, "s": 1000.0, "us": 1e-3}


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft:500ms,tpot:100ms"`` → ``{"ttft": 500.0, "tpot": 100.0}`` (milliseconds)."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", part)
        if not m or m.group(1) not in SLO_KEYS:
            raise LeanfmError(f"cannot parse the SLO '{text}': write bounds like ttft:500ms,tpot:100ms "
                              f"(keys {', '.join(SLO_KEYS)}; units ms, s or us)")
        value = float(m.group(2)) * _UNITS[m.group(3) or "ms"]
        if value <= 0:
            raise LeanfmError(f"SLO bound {part.strip()} must be positive")
        out[m.group(1)] = value
    return out


def check_loopback(url: str) -> str:
    """The endpoint's base URL (``http://host:port``) when it is on this machine; one-line error otherwise."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise LeanfmError(f"'{url}' is not an http URL; pass the server's base URL, e.g. http://127.0.0.1:8080")
    host = u.hostname
    try:
        loop = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = host == "localhost"
    if not loop:
        raise LeanfmError(f"load tests target this machine only: {host} is not a loopback address (use 127.0.0.1 or localhost)")
    return f"{u.scheme}://{u.netloc}"


@dataclass
class LoadSpec:
    """One load test. ``rate``: requests per second (Poisson when ``burstiness`` is 1; ``inf`` sends
    all at once); ``num_requests`` / ``duration``: the bounds (both apply); ``max_concurrency``:
    requests in flight at most (None: unbounded); ``drain``: seconds to wait for requests still
    running after the last arrival; ``ignore_eos``: ask the server to generate every requested
    token (vLLM's field; transformers' server refuses requests that carry it)."""

    rate: float
    num_requests: int = 32
    duration: float = 60.0
    burstiness: float = 1.0
    max_concurrency: int | None = None
    drain: float = 60.0
    seed: int = 0
    ignore_eos: bool = False
    request_timeout: float = 120.0

    def validate(self) -> None:
        if not (self.rate > 0):
            raise LeanfmError(f"--rate must be positive (got {self.rate}); use inf to send every request at once")
        if self.num_requests < 1:
            raise LeanfmError(f"--num-requests must be at least 1 (got {self.num_requests})")
        if not self.duration > 0:
            raise LeanfmError(f"--duration must be positive seconds (got {self.duration})")
        if not self.burstiness > 0:
            raise LeanfmError(f"--burstiness must be positive (got {self.burstiness}; 1 = Poisson)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise LeanfmError(f"--max-concurrency must be at least 1 (got {self.max_concurrency})")


def arrival_times(spec: LoadSpec) -> list[float]:
    """Send offsets in seconds from the start: gamma gaps (shape ``burstiness``, mean ``1/rate``),
    as many as fit ``num_requests`` and ``duration``."""
    rng = random.Random(spec.seed)
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        if out and math.isfinite(spec.rate):
            t += rng.gammavariate(spec.burstiness, 1.0 / (spec.rate * spec.burstiness))
        if t > spec.duration:
            break
        out.append(t)
    return out


@dataclass
class RequestResult:
    prompt_chars: int
    sent: float = 0.0  # seconds from the run's start
    ok: bool = False
    error: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    end: float | None = None
    max_tokens: int = 0
    finish_reason: str | None = None

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)


def make_requests(text: str, n: int, prompt_len: int, max_tokens: int, range_ratio: float = 0.0, seed: int = 0,
                  tokenizer=None) -> list[tuple[str, int]]:
    """``n`` (prompt, max_tokens) pairs: prompts are consecutive slices of ``text`` (tokens of
    ``tokenizer`` when given, else whitespace words), lengths uniform in ``len × [1 − r, 1 + r]``
    for both the prompt and the output; seeded."""
    if not 0 <= range_ratio < 1:
        raise LeanfmError(f"--range-ratio must be in [0, 1) (got {range_ratio})")
    if prompt_len < 1:
        raise LeanfmError(f"--prompt-len must be at least 1 (got {prompt_len})")
    if max_tokens < 1:
        raise LeanfmError(f"--max-tokens must be at least 1 (got {max_tokens})")
    rng = random.Random(seed)
    units = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else text.split()
    if not units:
        raise LeanfmError("no prompts to send: the prompt dataset gave no text")
    out, pos = [], 0

    def draw(mean: int) -> int:
        return max(1, round(rng.uniform(mean * (1 - range_ratio), mean * (1 + range_ratio))))

    for _ in range(n):
        k = min(draw(prompt_len), len(units))
        if pos + k > len(units):
            pos = 0
        piece = units[pos: pos + k]
        pos += k
        out.append((tokenizer.decode(piece) if tokenizer is not None else " ".join(piece), draw(max_tokens)))
    return out


async def _one(client, base: str, model: str | None, request: tuple[str, int], spec: LoadSpec, res: RequestResult,
               t_start: float) -> None:
    prompt, max_tokens = request
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if spec.ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    res.sent, res.max_tokens = t0 - t_start, max_tokens
    last = first = None
    chunks = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=spec.request_timeout) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                usage = msg.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens")
                choices = msg.get("choices") or []
                if not choices:
                    continue
                now = time.perf_counter()
                first = now if first is None else first
                res.finish_reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")), res.finish_reason)
                text = "".join(c.get("text") or "" for c in choices)
                if text:  # a token event: what TTFT and ITL time
                    if last is None:
                        res.ttft_ms = (now - t0) * 1e3
                    else:
                        res.itl_ms.append((now - last) * 1e3)
                    last = now
                    chunks += 1
        end = time.perf_counter()
        res.e2e_ms = (end - t0) * 1e3
        res.end = end - t_start
        res.output_tokens = res.output_tokens or chunks
        if res.ttft_ms is None and first is not None and res.output_tokens:  # tokens that decode to no text: all arrived at once
            res.ttft_ms = (first - t0) * 1e3
        res.ok = res.ttft_ms is not None
        if not res.ok:
            res.error = "the stream carried no completion"
    except asyncio.CancelledError:
        res.error = "cancelled: still running when the drain time ran out"
    except Exception as e:  # connection refused, timeout, bad stream: the request failed, the run goes on
        res.error = f"{type(e).__name__}: {str(e)[:160]}"


async def _run(base: str, model: str | None, requests: list[tuple[str, int]], spec: LoadSpec) -> tuple[list[RequestResult], float]:
    import httpx

    times = arrival_times(spec)
    results = [RequestResult(prompt_chars=len(requests[i % len(requests)][0])) for i in range(len(times))]
    sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    limits = httpx.Limits(max_connections=spec.max_concurrency or len(times) or 1, max_keepalive_connections=8)
    async with httpx.AsyncClient(limits=limits, timeout=spec.request_timeout) as client:
        t_start = time.perf_counter()

        async def launch(i: int) -> None:
            await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - t_start)))
            if sem is None:
                await _one(client, base, model, requests[i % len(requests)], spec, results[i], t_start)
                return
            async with sem:  # as vLLM's bench serve: latencies run from the send, after the slot wait
                await _one(client, base, model, requests[i % len(requests)], spec, results[i], t_start)

        tasks = [asyncio.ensure_future(launch(i)) for i in range(len(times))]
        deadline = (times[-1] if times else 0.0) + spec.drain
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - (time.perf_counter() - t_start)) + 1e-3)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return results, time.perf_counter() - t_start


def _pct(xs: list[float], q: float) -> float | None:
    return percentile(xs, q) if xs else None


def summarize(results: list[RequestResult], slo: dict[str, float], wall_s: float) -> dict:
    """Metrics of one load test (names in docs/results-schema.md, "Serving")."""
    ok = [r for r in results if r.ok]
    span = (max(r.end for r in ok) - min(r.sent for r in ok)) if ok else wall_s
    span = max(span, 1e-9)
    m: dict = {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
               "request_throughput": len(ok) / span, "output_token_throughput": sum(r.output_tokens for r in ok) / span,
               "duration_s": span, "mean_output_tokens": statistics.fmean(r.output_tokens for r in ok) if ok else None}
    series = {"ttft_ms": [r.ttft_ms for r in ok], "tpot_ms": [r.tpot_ms for r in ok if r.tpot_ms is not None],
              "itl_ms": [x for r in ok for x in r.itl_ms], "e2e_ms": [r.e2e_ms for r in ok]}
    for name, xs in series.items():
        for q in (50, 90, 99):
            m[f"{name}_p{q}"] = _pct(xs, q / 100)
        m[f"{name}_mean"] = statistics.fmean(xs) if xs else None

    def meets(r: RequestResult) -> bool:
        vals = {"ttft": r.ttft_ms, "tpot": r.tpot_ms, "e2e": r.e2e_ms, "itl": max(r.itl_ms) if r.itl_ms else None}
        return all(vals[k] is None and k in ("tpot", "itl") or (vals[k] is not None and vals[k] <= bound) for k, bound in slo.items())

    if slo:
        good = [r for r in ok if meets(r)]
        m["goodput"] = len(good) / span
        m["slo_attainment"] = len(good) / len(results) if results else 0.0
    return m


def run_load(url: str, requests: list[tuple[str, int]], spec: LoadSpec, slo: dict[str, float] | None = None,
             model: str | None = None) -> dict:
    """One load test against ``url`` with ``requests`` (prompt, max_tokens) pairs
    (:func:`make_requests`); ``{"metrics", "details"}`` (per-request records in details)."""
    spec.validate()
    base = check_loopback(url)
    if not requests:
        raise LeanfmError("no prompts to send: the prompt dataset gave no text")
    results, wall = asyncio.run(_run(base, model, requests, spec))
    errors = sorted({r.error for r in results if r.error})
    return {"metrics": summarize(results, slo or {}, wall),
            "details": {"spec": asdict(spec), "slo_ms": slo or {}, "url": base, "wall_s": wall, "errors": errors[:5],
                        "requests": [{"sent_s": round(r.sent, 4), "ok": r.ok, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms,
                                      "e2e_ms": r.e2e_ms, "output_tokens": r.output_tokens, "max_tokens": r.max_tokens,
                                      "finish_reason": r.finish_reason, "error": r.error} for r in results]}}
