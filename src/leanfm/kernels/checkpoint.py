"""Quantized checkpoints in leanfm's own format, reloadable without calibration.

A directory holds the Hugging Face ``config.json`` and tokenizer, ``model.safetensors`` with the
dense tensors plus, for each quantized linear ``NAME``: ``NAME.qweight`` (codes packed as in
:mod:`.packing`: two 4-bit nibbles per byte, or int8), ``NAME.scale`` (fp32 ``[out, groups]``)
and ``NAME.zero`` (uint8, or fp32 when fractional); ``leanfm-quant.json`` lists each layer's
``bits``, ``group_size`` and the backend that ran it. The stored layout does not depend on the
backend: loading picks the backend again (``auto`` by default), so the same file runs on the
int4 kernel here and on the reference path elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError
from ..formats.quantized import QuantizedWeight
from . import backends, packing
from .actquant import ActQuant
from .modules import set_module
from .qlinear import QuantLinear, is_symmetric

MANIFEST = "leanfm-quant.json"
FORMAT_VERSION = 1


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Packed linears by name: each ``QuantLinear``, and each member of a fused group (whose
    ``quantized_weight()`` gives back that member's own codes), not the group's fused storage."""
    from .fuse import FusedGroup, FusedSlice

    fused = {n + ".fused" for n, m in model.named_modules() if isinstance(m, FusedGroup)}
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, FusedSlice)) and n not in fused}


def act_quant_bits(model: nn.Module) -> dict[str, int]:
    """Layers wrapped with activation fake-quant (SmoothQuant's :class:`.actquant.ActQuant`):
    outer name -> bits."""
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, ActQuant)}


def kernel_summary(model: nn.Module) -> str:
    from . import backends

    used: dict[str, int] = {}
    for q in quantized_layers(model).values():
        used[q.backend.name] = used.get(q.backend.name, 0) + 1
    return "; ".join(f"{backends.BACKENDS[b].kernel} [{b}: {n} layers]" for b, n in used.items())


def dense_state(model: nn.Module, qlayers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """State dict without the quantized layers' buffers (tied tensors stored once)."""
    prefixes = tuple(n + "." for n in qlayers)
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            if not k.endswith(".bias"):
                continue
            k = k.replace(".inner.bias", ".bias")  # SmoothQuant's ActQuant wrapper: store under the layer's own name
        key = (v.untyped_storage().data_ptr(), v.dtype, tuple(v.shape))
        if key in seen:  # tied (e.g. lm_head.weight = embed_tokens.weight): transformers re-ties on load
            continue
        seen[key] = k
        out[k] = v.detach().contiguous()
    return out


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    qlayers = quantized_layers(model)
    tensors = dense_state(model, qlayers)
    layers = {}
    acts = act_quant_bits(model)
    for inner_name, q in qlayers.items():
        name = inner_name[: -len(".inner")] if inner_name.endswith(".inner") and inner_name[: -len(".inner")] in acts else inner_name
        qw = q.quantized_weight()
        tensors[f"{name}.qweight"] = packing.pack_codes(qw.codes, qw.bits)
        tensors.update({f"{name}.{k}": v for k, v in backends.canonical(qw).items()})
        layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "in_features": q.in_features,
                        "out_features": q.out_features, "bias": q.bias is not None, "backend": q.backend.name,
                        "act_bits": acts.get(name)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    (out / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "layers": layers}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def load_quantized(path: str | Path, backend: str | None = None) -> nn.Module:
    """Rebuild the model from its config, install QuantLinear layers, load the tensors.

    backend: None = the backend recorded for each layer when this machine runs it, else ``auto``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    man = json.loads((path / MANIFEST).read_text())
    if man.get("format_version") != FORMAT_VERSION:
        raise LeanfmError(f"{path / MANIFEST} has format_version {man.get('format_version')}; this leanfm reads {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(path / "model.safetensors"))
    for name, spec in man["layers"].items():
        try:
            qw = QuantizedWeight(
                packing.unpack_codes(tensors.pop(f"{name}.qweight"), spec["bits"]),
                tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.zero").float(), spec["bits"], spec["group_size"],
            )
        except KeyError as e:
            raise LeanfmError(f"quantized checkpoint {path} lacks tensor {e.args[0]}; the file is incomplete") from None
        bias = tensors.pop(f"{name}.bias", None)
        be = backend or spec.get("backend", "auto")
        if be not in backends.BACKENDS or backends.BACKENDS[be].unsupported(
            backends.Layout(qw.bits, qw.group_size, spec["in_features"], spec["out_features"]), is_symmetric(qw)
        ):
            be = "auto"
        layer = QuantLinear(qw, bias, be)
        if spec.get("act_bits"):
            layer = ActQuant(layer, spec["act_bits"])
        set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    qnames = tuple(man["layers"])
    missing = [k for k in missing if not k.startswith(qnames)]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        if "lm_head" not in man["layers"]:
            model.tie_weights()
    if missing or unexpected:
        raise LeanfmError(f"quantized checkpoint {path} does not match its config: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    from .fuse import fuse_shared_inputs

    fuse_shared_inputs(model.eval())
    return model
