"""``leanfm.load``: an alias, a local Hugging Face directory, or a hub id -> (model, tokenizer)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError
from .cache import build_cache
from .registry import ALIASES


def _from_dir(path: str, dtype: torch.dtype):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # leanfm shows its own progress; per-load bars are noise

    from .checkpoint import load_checkpoint

    tok = AutoTokenizer.from_pretrained(path)
    return load_checkpoint(path, dtype), tok


def load(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer in eval mode.

    ``name_or_path``: an alias from ``leanfm models`` (packaged weights, converted to an fp32
    cache on first use), a local directory with ``config.json``, or a Hugging Face hub id
    (needs network access to the hub).
    """
    t0 = time.perf_counter()
    name = str(name_or_path)
    if name in ALIASES:
        spec = ALIASES[name]
        spec.require_installed()
        path, source = str(build_cache(spec)), "packaged"
    elif os.path.isdir(name):
        if not (Path(name) / "config.json").exists():
            raise LeanfmError(f"directory '{name}' has no config.json; pass a Hugging Face model directory or an alias (see: leanfm models)")
        path, source = name, "local"
    elif name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/")):
        path, source = name, "hub"
    else:
        raise LeanfmError(
            f"unknown model '{name}'; use an alias ({', '.join(ALIASES)}), a local model directory, or a hub id like org/name"
        )
    try:
        model, tok = _from_dir(path, dtype)
    except LeanfmError:
        raise
    except (OSError, ValueError) as e:
        where = "the Hugging Face hub (is it reachable?)" if source == "hub" else f"'{path}'"
        raise LeanfmError(f"could not load model '{name}' from {where}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.leanfm_info = {
        "name": name, "path": path, "source": source, "tokenizer": tok,
        "load_seconds": round(time.perf_counter() - t0, 2), "steps": [],
    }
    from ..kernels.checkpoint import act_quant_bits, kernel_summary, quantized_layers

    if quantized_layers(model):  # a packed checkpoint: record what runs it
        acts = act_quant_bits(model)  # SmoothQuant activations are fake-quantized: simulated
        kernel = kernel_summary(model) + ("; fake-quant activations" if acts else "")
        model.leanfm_info["steps"].append({"method": "load-quantized", "simulated": bool(acts), "kernel": kernel})
    return model, tok
