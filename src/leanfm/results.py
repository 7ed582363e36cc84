"""results.json: the one schema every printed number comes from (docs/results-schema.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LeanfmError

SCHEMA_VERSION = "1.1"  # 1.1: predicted_* metrics and details.prediction


def new_results(environment: dict, protocol: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "environment": environment, "protocol": protocol, "runs": []}


def add_relative_metrics(run: dict, baseline: dict | None) -> None:
    """ppl_increase, compression_ratio and speedup against the baseline of the same invocation."""
    if baseline is None:
        return
    m, b = run["metrics"], baseline["metrics"]
    if m.get("perplexity") is not None and b.get("perplexity"):
        m["ppl_increase"] = m["perplexity"] / b["perplexity"] - 1.0
    if m.get("weight_bytes") and b.get("weight_bytes"):
        m["compression_ratio"] = b["weight_bytes"] / m["weight_bytes"]
    if m.get("decode_tokens_per_s") and b.get("decode_tokens_per_s"):
        m["speedup"] = m["decode_tokens_per_s"] / b["decode_tokens_per_s"]


def write(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` atomically (a crash never leaves a half-written file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read(path_or_dir: str | Path) -> dict:
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise LeanfmError(f"no results.json at {p}; pass a directory written by leanfm bench")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LeanfmError(f"{p} is not valid JSON (line {e.lineno}): {e.msg}") from None
    major = str(data.get("schema_version", "")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise LeanfmError(f"{p} has schema_version {data.get('schema_version')!r}; this leanfm reads {SCHEMA_VERSION}")
    return data
