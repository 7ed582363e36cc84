"""Convert a packaged GGUF once into a plain fp32 safetensors checkpoint in the cache.

transformers dequantizes GGUF to fp32 on load (SmolLM2: ~20 s) but refuses ``save_pretrained``
on such a model, so we rebuild a plain model from its config, load the state dict and save that.
Later loads read safetensors (about a second). Cache root: ``$LEANFM_CACHE`` or ``~/.cache/leanfm``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .. import progress
from ..errors import LeanfmError
from .packaged import gguf_path, remove_assembled, sha256_file
from .registry import ModelSpec


def cache_root() -> Path:
    """``$LEANFM_CACHE`` or ``~/.cache/leanfm`` (converted models, cached and default datasets)."""
    return Path(os.environ.get("LEANFM_CACHE") or Path.home() / ".cache" / "leanfm").expanduser()


def data_root() -> Path:
    """The default place for local datasets, searched after ``--data-dir`` and ``$LEANFM_DATA_DIR``."""
    return cache_root() / "data"


def model_cache_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def is_cached(alias: str) -> bool:
    return (model_cache_dir(alias) / "leanfm-source.json").exists()


def build_cache(spec: ModelSpec) -> Path:
    """Return the cached fp32 checkpoint dir for ``spec``, building it on first use."""
    dest = model_cache_dir(spec.alias)
    if is_cached(spec.alias):
        return dest
    if spec.layout == "build":
        return _build_with(spec, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the one slow step: let transformers show its GGUF progress

    work = cache_root() / "assemble" / spec.alias
    path = gguf_path(spec, work)
    progress.info(f"first use of {spec.alias}: converting {path.name} to fp32 safetensors in {dest} (once)")
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        raise LeanfmError(
            f"{path} has sha256 {digest[:12]}…, expected {spec.sha256[:12]}…; reinstall with: {spec.install}"
        )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gg = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = gg.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gg.state_dict(), strict=True)
    del gg
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "leanfm-source.json").write_text(json.dumps({
        "alias": spec.alias, "gguf": path.name, "gguf_sha256": digest, "license": spec.license,
        "convert_seconds": round(time.perf_counter() - t0, 1), "dtype": "float32",
    }, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    remove_assembled(path, work)
    return dest


def _build_with(spec: ModelSpec, dest: Path) -> Path:
    """The cache folder of a model its ``builder`` writes (weights that ship in another format)."""
    from importlib import import_module

    spec.require_installed()
    progress.info(f"first use of {spec.alias}: building its fp32 checkpoint in {dest} (once)")
    t0 = time.perf_counter()
    mod, _, fn = spec.builder.partition(":")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = getattr(import_module(mod), fn)(tmp)
    (tmp / "leanfm-source.json").write_text(json.dumps({
        "alias": spec.alias, **source, "license": spec.license, "family": spec.family,
        "convert_seconds": round(time.perf_counter() - t0, 1), "dtype": "float32",
    }, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
