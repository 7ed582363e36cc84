"""What identifies a measurement: content hashes of the model, the recipe and the protocol.

Torch-free (standard library plus leanfm's torch-free method declarations). Every hash is the
sha256 hex digest of a canonical JSON text: keys sorted, no spaces, tuples as lists, and floats
with an integral value written as integers (``bits: 4.0`` and ``bits: 4`` are one candidate).

- :func:`model_hash`: the bytes of a model file, or of a model folder's weight, config and
  tokenizer files (:data:`MODEL_SUFFIXES`), with their relative names; not its path or mtime.
- :func:`recipe_hash`: the recipe's ``seed`` and ``steps`` only, each step with its method's
  defaults filled in; the recipe's name and description do not count.
- :func:`protocol_hash`: every protocol field except :data:`PROTOCOL_COSMETIC`; extra keys a
  caller adds (e.g. ``runtime``) are hashed as given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import LeanfmError, os_reason

# Files of a model folder that make its numbers: weights, config and tokenizer files.
MODEL_SUFFIXES = (".safetensors", ".gguf", ".json", ".model", ".txt", ".bin", ".onnx", ".tiktoken")
# Protocol fields that do not change a number: where the dataset's files lie (its name is kept).
PROTOCOL_COSMETIC = ("data_dir",)
_CHUNK = 1 << 20


def _plain(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    return obj


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` that hashes use."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


# --- model ---------------------------------------------------------------------------------

def model_files(path: str | Path) -> list[tuple[str, Path]]:
    """``(relative name, file)`` of what :func:`model_hash` reads, in sorted-name order."""
    p = Path(path)
    if p.is_file():
        return [("", p)]
    if not p.is_dir():
        raise LeanfmError(f"cannot hash model '{path}': no such file or folder")
    found = []
    for f in p.rglob("*"):
        rel = f.relative_to(p)
        if f.is_file() and f.suffix in MODEL_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), f))
    if not found:
        raise LeanfmError(f"cannot hash model '{path}': it holds no {', '.join(MODEL_SUFFIXES)} files")
    return sorted(found)


def model_fingerprint(files: list[tuple[str, Path]]) -> str:
    """The cache key of a digest: each file's name, size and mtime (ns)."""
    stats = []
    for rel, f in files:
        st = f.stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    return canonical_json(stats)


def _digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for rel, f in files:
        if rel:  # a folder: the name and length frame each file's bytes
            h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
        except OSError as e:
            raise LeanfmError(f"cannot hash model file '{f}': {os_reason(e)}") from None
    return h.hexdigest()


def model_hash(path: str | Path, store=None) -> str:
    """sha256 of a model file's or folder's content (see :data:`MODEL_SUFFIXES`), streamed in
    1 MiB chunks. With ``store`` (a :class:`leanfm.search.store.Store`), the digest is cached
    there under (absolute path, each file's size and mtime), so a large model is read once."""
    files = model_files(path)
    if store is None:
        return _digest(files)
    where = os.path.realpath(path)
    fingerprint = model_fingerprint(files)
    cached = store.cached_model_hash(where, fingerprint)
    if cached:
        return cached
    digest = _digest(files)
    store.save_model_hash(where, fingerprint, digest)
    return digest


# --- recipe and protocol -------------------------------------------------------------------

def normalize_step(step: Any) -> dict:
    """A step as ``{method, **every parameter}`` via the method's declaration (defaults filled,
    validated); a step of an unknown method, or one its declaration refuses, as given."""
    from ..config import config_from_dict

    d = _plain(step)
    try:
        return _plain(config_from_dict(dict(d)).to_dict())
    except (LeanfmError, TypeError):
        return d


def recipe_hash(recipe: Any) -> str:
    """sha256 of a recipe's ``seed`` (default 0) and normalized ``steps``; the name and
    description do not count. ``recipe`` is a dict or a :class:`leanfm.recipe.Recipe`."""
    d = _plain(recipe)
    if not isinstance(d, dict):
        raise LeanfmError(f"cannot hash recipe {recipe!r}: expected a mapping with seed and steps")
    steps = [normalize_step(s) for s in d.get("steps") or []]
    return sha256_json({"seed": d.get("seed", 0), "steps": steps})


def normalize_protocol(protocol: Any) -> dict:
    """Protocol fields with defaults filled, :data:`PROTOCOL_COSMETIC` dropped, ``groups`` sorted."""
    from ..measure.protocol import Protocol

    d = _plain(protocol)
    full = _plain(Protocol().to_dict())
    full.update(d)
    for name in PROTOCOL_COSMETIC:
        full.pop(name, None)
    if isinstance(full.get("groups"), list):
        full["groups"] = sorted(full["groups"])
    return full


def protocol_hash(protocol: Any) -> str:
    """sha256 of :func:`normalize_protocol` (a dict or a :class:`leanfm.Protocol`)."""
    return sha256_json(normalize_protocol(protocol))


def search_id(model: str, space: Any, budget: Any, objectives: Any, seed: int) -> str:
    """The identity of a search: the same model hash, space, budget, objectives and seed name
    the same search, so the same command resumes it."""
    return sha256_json({"model": model, "space": space, "budget": budget, "objectives": objectives, "seed": seed})


@dataclasses.dataclass(frozen=True)
class ResultKey:
    """What a stored run is keyed by: model hash, recipe hash, dataset, protocol hash, leanfm version."""

    model: str
    recipe: str
    dataset: str
    protocol: str
    version: str

    @classmethod
    def of(cls, model: str, recipe: Any, protocol: Any, version: str | None = None) -> "ResultKey":
        """Key of ``recipe`` measured on the model whose hash is ``model`` under ``protocol``."""
        if version is None:
            from importlib.metadata import version as dist_version

            version = dist_version("leanfm")
        p = normalize_protocol(protocol)
        return cls(model, recipe_hash(recipe), str(p.get("dataset")), sha256_json(p), version)
