"""``leanfm compress`` for a model larger than memory: one decoder layer in RAM at a time.

The checkpoint stays on disk (:class:`leanfm.models.onload.Onloaded`); everything outside the
decoder stack (embeddings, final norm, head) is read at the start. Then the recipe's one step
that changes the decoder layers runs as its declaration says (``onload`` in its config):

- ``layerwise`` (GPTQ, ...): the handler runs as always; its ``LayerwiseRunner`` reads each
  layer before processing it and writes and releases it when done (``model.leanfm_stream``);
- ``per-layer`` (RTN, HQQ, ...): the handler is applied to one layer at a time, restricted to
  that layer's linears (``only``), then the layer is written and released;
- ``outside`` steps (``embed_quant``) touch only the resident modules.

The output is written into a temporary sibling folder, one safetensors file per layer plus one
for the rest and the index; the folder is renamed to ``--out`` only once complete, so an
interrupted run leaves nothing that loads as a checkpoint. The same per-layer code runs in
memory, so both paths give the same codes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .errors import LeanfmError
from .recipe import Recipe

LAYER_STEPS = ("layerwise", "per-layer")


def unsupported(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot run onloaded (None: it can)."""
    whole = [s.method for s in recipe.steps if not type(s).onload]
    if whole:
        return (f"step {whole[0]} of recipe {recipe.name} needs the whole model in memory (leanfm methods shows which methods "
                "run one layer at a time)")
    for s in recipe.steps:
        why = s.onload_check()
        if why:
            return why
    layer_steps = [s.method for s in recipe.steps if type(s).onload in LAYER_STEPS]
    if len(layer_steps) > 1:
        return (f"recipe {recipe.name} changes the decoder layers in {len(layer_steps)} steps ({', '.join(layer_steps)}); "
                "onloading runs one such step per pass: compress with the first, then the result with the next")
    return None


def _stack_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from .methods.layers import decoder_layers

    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers), layers


def _per_layer(model: nn.Module, cfg, stream, layers: nn.ModuleList, prefix: str) -> dict:
    """A calibration-free per-linear handler applied one decoder layer at a time."""
    from .config import lookup

    _, handler = lookup(cfg.method)
    names = list(cfg.targets(model))
    if not names:
        raise LeanfmError(f"{cfg.method} found no nn.Linear layers to quantize (check 'skip' and 'only')")
    infos = []
    for i, layer in enumerate(layers):
        stream.load_layer(i)
        mine = tuple(n for n in names if n.startswith(f"{prefix}.{i}."))
        if mine:
            infos.append(handler(model, dataclasses.replace(cfg, only=mine), None))
        stream.store_layer(i, layer)
    rest = tuple(n for n in names if not n.startswith(prefix + "."))
    if rest:
        infos.append(handler(model, dataclasses.replace(cfg, only=rest), None))
    info = dict(infos[-1])
    info["layers"] = sum(x.get("layers", 0) for x in infos)
    info["simulated"] = any(x.get("simulated") for x in infos)
    return info


def deferred_head(src, recipe: Recipe) -> str | None:
    """The untied head's name when no step of ``recipe`` reads or changes it (it is then loaded
    only to be written, after the layers), else None."""
    head = src.untied_head()
    if head is None:
        return None
    for step in recipe.steps:
        if type(step).onload == "outside":
            return None
        targets = getattr(step, "targets", None)
        if callable(targets) and head in targets(src.model):
            return None
    return head


def compress_onloaded(path: "str | Path | Onloaded", recipe: Recipe, calib: torch.Tensor | None, out: str | Path, tokenizer,
                      overwrite: bool = False, extra_files: dict[str, str] | None = None,
                      activation_budget: int | None = None) -> nn.Module:
    """Apply ``recipe`` to the checkpoint folder ``path`` one layer at a time, writing to ``out``.
    Returns the model skeleton (its steps recorded in ``leanfm_info``; the layers are on disk).
    ``path`` may be an :class:`~leanfm.models.onload.Onloaded` already opened (e.g. for the plan)."""
    from .api import apply_
    from .kernels.checkpoint import module_tensors, write_manifest
    from .models.checkpoint import partial_folder
    from .models.onload import Onloaded, Stream

    why = unsupported(recipe)
    if why:
        raise LeanfmError(f"cannot compress onloaded: {why}")
    src = path if isinstance(path, Onloaded) else Onloaded(path)
    path = src.path
    model = src.model
    prefix, layers = _stack_name(model)
    head = deferred_head(src, recipe)
    src.load_outside(prefix, defer=(head,) if head else ())
    model.leanfm_info = {"name": str(path), "path": str(path), "source": "onloaded", "tokenizer": tokenizer, "steps": [],
                         "source_dtypes": src.source_dtypes}
    for step in recipe.steps:
        step.validate()
        step.check_model(model)
    with partial_folder(out, overwrite) as tmp:
        stream = Stream(src, tmp, prefix, activation_budget, scratch=Path(tmp).parent)
        model.leanfm_stream = stream
        try:
            torch.manual_seed(recipe.seed)
            for step in recipe.steps:
                if type(step).onload == "per-layer":
                    info = _per_layer(model, step, stream, layers, prefix)
                    model.leanfm_info["steps"].append({**step.to_dict(), **info})
                else:
                    apply_(model, step, calib)
            for i, layer in enumerate(layers):  # layers no step changed are copied through
                if i not in stream.stored:
                    stream.load_layer(i)
                    stream.store_layer(i, layer)
            if head:
                src.load(head)  # no layer is in memory now
            tensors, entries = module_tensors(model, exclude=prefix)
            stream.writer.write("rest", tensors)
            stream.writer.close()
            manifest = {**stream.manifest, **entries}
            if manifest:
                write_manifest(tmp, manifest)
            model.config.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        finally:
            del model.leanfm_stream
    return model
