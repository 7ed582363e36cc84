"""``leanfm loadtest URL``: drive an OpenAI-compatible endpoint at one or more arrival rates.

Each rate is one run of ``results.json`` (schema in docs/results-schema.md, "Serving"): the
load-test metrics, the spec, and every request's record. The endpoint must answer ``GET
/v1/models`` (or ``/health``) first, so a wrong port is one line, not a sweep of failures.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..errors import LeanfmError


def _rates(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        try:
            r = float(part)
        except ValueError:
            raise LeanfmError(f"--rate takes requests per second, comma-separated for a sweep (e.g. 0.5,1,2 or inf); got '{part}'") from None
        if not r > 0:
            raise LeanfmError(f"--rate must be positive (got {part}); use inf to send every request at once")
        out.append(r)
    return out


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("url", help="the server's base URL on this machine, e.g. http://127.0.0.1:8080")
    s.add_argument("--rate", default="1", help="requests per second; a comma-separated list runs a sweep; inf sends all at once (default 1)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson, <1 burstier (default 1)")
    s.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: unbounded)")
    s.add_argument("--num-requests", type=int, default=32, help="requests per rate at most (default 32)")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate at most (default 60)")
    s.add_argument("--drain", type=float, default=60.0, help="seconds to wait for requests still running after the last "
                   "arrival; later ones are cancelled and count as failed (default 60)")
    s.add_argument("--dataset", default="wikitext2", help="prompt text: wikitext2 (test split), gensim-wiki or a .txt (default wikitext2)")
    s.add_argument("--data-dir", default=None, help="folder holding wikitext-2/ (as for bench)")
    s.add_argument("--prompt-len", type=int, default=128, help="mean prompt length, in tokens with --tokenizer, else words (default 128)")
    s.add_argument("--max-tokens", type=int, default=32, help="mean output tokens asked per request (default 32)")
    s.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn uniformly in mean x [1-r, 1+r] (default 0: fixed)")
    s.add_argument("--tokenizer", default=None, help="model alias or directory whose tokenizer cuts the prompts (default: words)")
    s.add_argument("--model-name", default=None, help="the 'model' field sent with each request (default: the server's first model)")
    s.add_argument("--slo", default=None, help="latency bounds for goodput, e.g. ttft:500ms,tpot:100ms (keys ttft, tpot, itl, e2e)")
    s.add_argument("--ignore-eos", action="store_true", help="ask the server to generate every requested token (vLLM, "
                   "llama.cpp; transformers' server refuses the field)")
    s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to come up before the first rate "
                   "(default 0: it must answer now)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", default="endpoint", help="name of this server/recipe in the results (default endpoint)")
    s.add_argument("--out", default=None, help="results folder (default runs/loadtest-<timestamp>)")
    s.add_argument("--overwrite", action="store_true", help="replace the results already in --out (default: refuse)")


def served_model(base: str, timeout: float = 5.0, wait: float = 0.0) -> str | None:
    """The first model id the server lists; a one-line error when nothing answers at ``base``
    (after polling for up to ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _served_model(base, timeout)
        except LeanfmError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _served_model(base: str, timeout: float) -> str | None:
    import httpx

    last = None
    for path in ("/v1/models", "/health"):  # transformers' serve lists no pinned model (and fails without an HF cache)
        try:
            r = httpx.get(base + path, timeout=timeout)
        except httpx.HTTPError as e:
            last = e
            continue
        if r.status_code == 200:
            try:
                data = r.json().get("data") or []
            except ValueError:
                data = []
            return data[0].get("id") if data and isinstance(data[0], dict) else None
    why = f"{type(last).__name__}" if last is not None else "no /v1/models or /health answered 200"
    raise LeanfmError(f"cannot reach an OpenAI-compatible server at {base} ({why}); start one first (leanfm serve ...) "
                      "or check the port")


def run(a) -> int:
    from ..data.text import load_text
    from ..measure.loadtest import LoadSpec, check_loopback, make_requests, parse_slo
    from ..outdir import OutputDir, default_out

    base = check_loopback(a.url)
    rates = _rates(a.rate)
    slo = parse_slo(a.slo)
    specs = [LoadSpec(rate=r, num_requests=a.num_requests, duration=a.duration, burstiness=a.burstiness,
                      max_concurrency=a.max_concurrency, drain=a.drain, seed=a.seed, ignore_eos=a.ignore_eos) for r in rates]
    for sp in specs:
        sp.validate()
    tok = None
    if a.tokenizer:
        from ..models.load import load_tokenizer, resolve

        tok = load_tokenizer(resolve(a.tokenizer)[0])
    reqs = make_requests(load_text(a.dataset, "test", a.data_dir), a.num_requests, a.prompt_len, a.max_tokens, a.range_ratio,
                         a.seed, tok)
    if a.wait < 0:
        raise LeanfmError(f"--wait must be 0 or more seconds (got {a.wait})")
    found = served_model(base, wait=a.wait)
    model = a.model_name or found
    with OutputDir(a.out or default_out("loadtest"), a.overwrite) as out:
        return _sweep(a, base, specs, slo, reqs, model, tok, out, rates)


def _sweep(a, base, specs, slo, reqs, model, tok, out: Path, rates) -> int:
    from .. import progress
    from ..measure.environment import environment
    from ..measure.loadtest import run_load
    from ..report.serving import write_loadtest_report
    from ..results import new_results, write

    results = new_results(environment(1), {"kind": "loadtest", "url": base, "rates": rates, "slo_ms": slo,
                                          "dataset": a.dataset, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
                                          "range_ratio": a.range_ratio, "prompt_unit": "tokens" if tok else "words"})
    results["kind"] = "loadtest"
    for sp in specs:
        label = "inf" if math.isinf(sp.rate) else f"{sp.rate:g}"
        progress.info(f"load test at {label} req/s: up to {sp.num_requests} requests / {sp.duration:g} s of arrivals")
        res = run_load(base, reqs, sp, slo, model)
        results["runs"].append({"recipe": {"name": a.label}, "status": "ok", "rate": sp.rate,
                                "metrics": {"arrival_rate": sp.rate, **res["metrics"]}, "details": res["details"], "flags": {}})
        write(results, out)  # after every rate: a stopped sweep keeps what it measured
        write_loadtest_report(results, out)
        m = res["metrics"]
        fmt = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
        progress.info(f"  {m['completed']}/{m['requests']} ok; TTFT p50 {fmt(m['ttft_ms_p50'])} p99 {fmt(m['ttft_ms_p99'])} ms; "
                      f"TPOT p50 {fmt(m['tpot_ms_p50'])} p99 {fmt(m['tpot_ms_p99'])} ms; {m['request_throughput']:.2f} req/s"
                      + (f"; goodput {m['goodput']:.2f} req/s" if "goodput" in m else ""))
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.html'}")
    return 0
