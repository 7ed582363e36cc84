"""results.json: the one schema every printed number comes from (docs/results-schema.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LeanfmError

SCHEMA_VERSION = "1.1"  # 1.1: predicted_* metrics and details.prediction


def new_results(environment: dict, protocol: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "environment": environment, "protocol": protocol, "runs": []}


def start_results(model_name: str, recipes, protocol, profile: dict, out: Path, runtime: str, dataset: str) -> dict:
    """The results header of a family bench (``bench_vision``, ``bench_diffusion``): environment,
    protocol (its ``dataset`` what this family measures on, not the LM default), model, hardware
    profile, the runtime and the interleaved speed schedule; every recipe saved as YAML under
    ``out/recipes``."""
    from .measure.environment import environment
    from .recipe import recipe_file_stem

    seed = recipes[0].seed
    results = new_results(environment(protocol.threads, seed=seed), {**protocol.to_dict(), "dataset": dataset})
    results["model"] = model_name
    results["hardware_profile"] = profile
    results["environment"]["runtime"] = runtime
    results["environment"]["speed_schedule"] = "interleaved"
    for r in recipes:
        r.save(Path(out) / "recipes" / f"{recipe_file_stem(r.name)}.yaml")
    return results


def add_relative_metrics(run: dict, baseline: dict | None) -> None:
    """ppl_increase, compression_ratio and speedup (decode tokens/s, images/s for a vision model,
    samples/s for a diffusion model) against the baseline of the same invocation."""
    if baseline is None:
        return
    m, b = run["metrics"], baseline["metrics"]
    if m.get("perplexity") is not None and b.get("perplexity"):
        m["ppl_increase"] = m["perplexity"] / b["perplexity"] - 1.0
    if m.get("weight_bytes") and b.get("weight_bytes"):
        m["compression_ratio"] = b["weight_bytes"] / m["weight_bytes"]
    for rate in ("decode_tokens_per_s", "images_per_s", "samples_per_s"):  # a causal LM's, a vision model's, a denoiser's
        if m.get(rate) and b.get(rate):
            m["speedup"] = m[rate] / b[rate]
            break


def write(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` atomically (a crash never leaves a half-written file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_json(p: Path, name: str, writer: str):
    """The JSON in ``p`` (a ``name`` file: results.json, search.json), or a one-line LeanfmError naming what is wrong."""
    if not p.is_file():
        raise LeanfmError(f"no {name} at {p}; pass a directory written by {writer}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LeanfmError(f"{p} is not valid JSON (line {e.lineno}): {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LeanfmError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None


def read(path_or_dir: str | Path) -> dict:
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / "results.json"
    data = read_json(p, "results.json", "leanfm bench")
    validate(data, p)
    return data


_FIX = "it is not a results.json written by leanfm bench/eval; pass the directory of one"


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def validate(data, path: str | Path = "results.json") -> None:
    """The structure every reader relies on, or a one-line LeanfmError naming ``path`` and the problem:
    a top-level object with a ``schema_version`` of this major version and ``runs``, a list of
    objects, each with a ``recipe`` object holding a ``name``; ``metrics`` / ``details`` / ``flags``,
    ``environment`` / ``protocol`` objects where present."""
    p = path
    if not isinstance(data, dict):
        raise LeanfmError(f"{p}: the top level is {_kind(data)}, expected an object with schema_version and runs; {_FIX}")
    if "schema_version" not in data:
        raise LeanfmError(f"{p} lacks 'schema_version'; {_FIX}")
    major = str(data.get("schema_version", "")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise LeanfmError(f"{p} has schema_version {data.get('schema_version')!r}; this leanfm reads {SCHEMA_VERSION}: "
                          "re-run leanfm bench/eval with this leanfm, or read the file with the leanfm that wrote it")
    if "runs" not in data:
        raise LeanfmError(f"{p} lacks 'runs' (the list of measured recipes); {_FIX}")
    runs = data["runs"]
    if not isinstance(runs, list):
        raise LeanfmError(f"{p}: 'runs' is {_kind(runs)}, expected a list of run objects; {_FIX}")
    for key in ("environment", "protocol", "hardware_profile"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise LeanfmError(f"{p}: '{key}' is {_kind(data[key])}, expected an object; {_FIX}")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise LeanfmError(f"{p}: runs[{i}] is {_kind(run)}, expected an object; {_FIX}")
        recipe = run.get("recipe")
        if not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str):
            raise LeanfmError(f"{p}: runs[{i}] lacks a recipe object with a name; {_FIX}")
        for key in ("metrics", "details", "flags"):
            if run.get(key) is not None and not isinstance(run[key], dict):
                raise LeanfmError(f"{p}: runs[{i}].{key} is {_kind(run[key])}, expected an object; {_FIX}")
