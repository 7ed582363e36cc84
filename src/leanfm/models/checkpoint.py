"""Checkpoints of (compressed) models: the one place that decides which format a model is saved
in and which loader reads a directory back.

The file layouts live with the layers they store:

- ``leanfm-quant`` (:mod:`leanfm.kernels.checkpoint`): packed quantized linears plus
  ``leanfm-quant.json``; reloads without calibration on whichever backend this machine runs.
- ``leanfm-lowrank`` (:mod:`leanfm.kernels.lowrank`): factorized linears plus
  ``leanfm-lowrank.json``, which plain transformers cannot rebuild.
- plain Hugging Face (``save_pretrained`` / ``from_pretrained``): every other model (pruned,
  structurally smaller, fake-quantized fp32).
- ``compressed-tensors`` (:mod:`leanfm.kernels.export_ct`, written only): the packed layers in
  the ``pack-quantized`` format vLLM and transformers read.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError
from ..kernels.checkpoint import dense_state, is_quantized_checkpoint, load_quantized, quantized_layers, save_quantized
from ..kernels.lowrank import is_lowrank_checkpoint, load_lowrank, lowrank_layout, save_lowrank

FORMATS = ("leanfm", "compressed-tensors")


def save_checkpoint(model: nn.Module, out: str | Path, tokenizer=None, fmt: str = "leanfm",
                    source: str = "the model") -> Path:
    """Write ``model`` (and ``tokenizer`` when given) to the directory ``out``; return it.

    ``fmt="leanfm"``: packed quantized layers in the leanfm-quant format, else factorized layers
    in the leanfm-lowrank format, else a plain Hugging Face directory. ``fmt="compressed-tensors"``:
    the packed layers in the compressed-tensors format (refused, naming ``source``, when the
    model has none).
    """
    if fmt not in FORMATS:
        raise LeanfmError(f"unknown checkpoint format '{fmt}'; use one of {', '.join(FORMATS)}")
    out = Path(out)
    qlayers = quantized_layers(model)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "compressed-tensors":
        from ..kernels.export_ct import export_compressed_tensors

        if not qlayers:
            raise LeanfmError(f"{source} leaves no packed quantized layers; "
                              "compressed-tensors export needs a quantizing recipe without backend: fake")
        dense = dense_state(model, qlayers)
        export_compressed_tensors(model.config, dense, {n: q.quantized_weight() for n, q in qlayers.items()}, out, tokenizer)
        return out
    if qlayers:
        return save_quantized(model, out, tokenizer)
    if lowrank_layout(model):  # two smaller linears per layer: plain transformers cannot rebuild them
        save_lowrank(model, out)
    else:
        model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model stored in the directory ``path`` by the loader its format needs (``dtype``
    applies to a plain Hugging Face directory; the leanfm formats rebuild their own)."""
    if is_quantized_checkpoint(path):
        return load_quantized(path)
    if is_lowrank_checkpoint(path):  # factorized linears: rebuild them before loading
        return load_lowrank(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def tensors_file_bytes(model: nn.Module) -> int:
    """Size of the model's ``model.safetensors``, written for real to a temporary directory:
    packed models in the leanfm-quant format :func:`save_checkpoint` writes, any other model as
    its own tensors (tied ones stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="leanfm-size-") as d:
        path = os.path.join(d, "model.safetensors")
        if quantized_layers(model):
            save_quantized(model, d)
        else:
            save_model(model, path)
        return os.path.getsize(path)
