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
import struct
from pathlib import Path

import torch
from torch import nn

from ..allocator import trim_heap
from ..errors import LeanfmError
from ..formats.quantized import QuantizedWeight
from ..formats.tensorfiles import REWRITE_HINT, check_safetensors  # noqa: F401 - re-exported for the loaders
from . import backends, packing
from .actquant import ActQuant
from .modules import set_module
from ..formats.layout import ROW_LOCAL
from .qembedding import QuantEmbedding
from .qlinear import QuantLinear, is_symmetric

MANIFEST = "leanfm-quant.json"
FORMAT_VERSION = 1


def check_tensor_files(path: str | Path) -> None:
    """:func:`check_safetensors` for every ``*.safetensors`` file directly in the folder ``path``."""
    for f in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(f)


_INT = "a whole number"
_TYPES = {int: _INT, bool: "true or false", str: "a string", dict: "an object", type(None): "null"}


def _is(v, types: tuple) -> bool:
    if isinstance(v, bool):  # JSON true/false are not numbers here
        return bool in types
    return isinstance(v, types)


def read_manifest(file: str | Path, version: int, layer_fields: dict[str, tuple], optional: dict[str, tuple] | None = None) -> dict:
    """The JSON manifest ``file`` checked against its schema: ``{"format_version": version,
    "layers": {name: {field: value}}}`` with each field of ``layer_fields`` (required) and
    ``optional`` of the given JSON types. Anything else: one line naming the file and the problem."""
    file = Path(file)
    fix = f"the checkpoint is damaged: {REWRITE_HINT}"
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LeanfmError(f"{file} is not a text file; {fix}") from None
    except OSError as e:
        raise LeanfmError(f"cannot read {file}: {e.strerror or e}; check that the file is readable") from None
    try:
        man = json.loads(text)
    except json.JSONDecodeError as e:
        raise LeanfmError(f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    if not isinstance(man, dict):
        raise LeanfmError(f"{file} holds a JSON {type(man).__name__}, not an object with format_version and layers; {fix}")
    if "format_version" not in man:
        raise LeanfmError(f"{file} has no format_version; {fix}")
    if man["format_version"] != version:
        raise LeanfmError(f"{file} has format_version {man['format_version']!r}; this leanfm reads {version}: "
                          "upgrade leanfm, or re-run leanfm compress with this version")
    layers = man.get("layers")
    if not isinstance(layers, dict):
        raise LeanfmError(f"{file} has {'no layers' if layers is None else 'layers that are not an object of name: entry'}; {fix}")
    fields = {**layer_fields, **(optional or {})}
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise LeanfmError(f"{file}: layer '{name}' is not an object of its settings; {fix}")
        for key, types in fields.items():
            if key not in spec:
                if key in layer_fields:
                    raise LeanfmError(f"{file}: layer '{name}' has no '{key}'; {fix}")
                continue
            v = spec[key]
            if not _is(v, types) or (isinstance(v, int) and not isinstance(v, bool) and v < 1):
                want = " or ".join(_TYPES.get(t, t.__name__) for t in types)
                if int in types:
                    want = want.replace(_INT, "a positive whole number")
                raise LeanfmError(f"{file}: layer '{name}' has {key} = {json.dumps(v)}, expected {want}; {fix}")
    return man


def read_quant_manifest(path: str | Path) -> dict:
    """``leanfm-quant.json`` of the checkpoint folder ``path``, schema-checked."""
    return read_manifest(Path(path) / MANIFEST, FORMAT_VERSION,
                         {"bits": (int,), "group_size": (int,), "in_features": (int,), "out_features": (int,), "bias": (bool,)},
                         {"backend": (str, type(None)), "act_bits": (int, type(None)), "kind": (str,), "tied_head": (str, type(None))})


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Packed linears by name: each ``QuantLinear``, and each member of a fused group (whose
    ``quantized_weight()`` gives back that member's own codes), not the group's fused storage."""
    from .fuse import FusedGroup, FusedSlice

    fused = {n + ".fused" for n, m in model.named_modules() if isinstance(m, FusedGroup)}
    tables = {id(e.table) for e in quantized_embeddings(model).values()}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, FusedSlice)) and n not in fused and id(m) not in tables}


def quantized_embeddings(model: nn.Module) -> dict[str, QuantEmbedding]:
    """Packed token embeddings (embed_quant) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}


def tied_head_name(model: nn.Module, emb: QuantEmbedding) -> str | None:
    """The name under which the embedding's packed table also serves as the LM head, if it does."""
    return next((n for n, m in model.named_modules(remove_duplicate=False) if m is emb.table and not n.endswith(".table")), None)


def act_quant_bits(model: nn.Module) -> dict[str, int]:
    """Layers wrapped with activation fake-quant (SmoothQuant's :class:`.actquant.ActQuant`):
    outer name -> bits."""
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, ActQuant)}


def kernel_summary(model: nn.Module) -> str:
    from . import backends

    used: dict[str, int] = {}
    for q in [*quantized_layers(model).values(), *(e.table for e in quantized_embeddings(model).values())]:
        used[q.backend.name] = used.get(q.backend.name, 0) + 1
    return "; ".join(f"{backends.BACKENDS[b].kernel} [{b}: {n} layers]" for b, n in used.items())


def dense_state(model: nn.Module, qlayers: dict[str, QuantLinear], exclude: str | None = None) -> dict[str, torch.Tensor]:
    """State dict without the quantized layers' and embeddings' buffers (tied tensors stored once),
    and without anything under the name prefix ``exclude``."""
    embs = quantized_embeddings(model)
    prefixes = tuple(n + "." for n in [*qlayers, *embs, *filter(None, (tied_head_name(model, e) for e in embs.values()))])
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        if exclude and k.startswith(exclude + "."):
            continue
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


def module_tensors(module: nn.Module, prefix: str = "", exclude: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What storing ``module`` (found at ``prefix`` in its model) writes: the tensors by full name
    (dense ones as they are; each packed layer as ``qweight`` + canonical scale/zero) and the
    manifest entry of each packed layer or embedding. ``exclude``: a name prefix left out (an
    onloaded model's layer stack, written layer by layer)."""
    def kept(name: str) -> bool:
        return not exclude or not (name == exclude or name.startswith(exclude + "."))

    qlayers = {n: q for n, q in quantized_layers(module).items() if kept(n)}
    tensors = dense_state(module, qlayers, exclude)
    layers = {}
    acts = act_quant_bits(module)
    for inner_name, q in qlayers.items():
        name = inner_name[: -len(".inner")] if inner_name.endswith(".inner") and inner_name[: -len(".inner")] in acts else inner_name
        qw = q.quantized_weight()
        tensors[f"{name}.qweight"] = packing.pack_codes(qw.codes, qw.bits)
        tensors.update({f"{name}.{k}": v for k, v in backends.canonical(qw).items()})
        layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "in_features": q.in_features,
                        "out_features": q.out_features, "bias": q.bias is not None, "backend": q.backend.name,
                        "act_bits": acts.get(name)}
    for name, e in quantized_embeddings(module).items():
        if not kept(name):
            continue
        qw = e.table.quantized_weight()
        tensors[f"{name}.qweight"] = packing.pack_codes(qw.codes, qw.bits)
        tensors.update({f"{name}.{k}": v for k, v in backends.canonical(qw).items()})
        layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "in_features": e.table.in_features,
                        "out_features": e.table.out_features, "bias": False, "backend": e.table.backend.name,
                        "kind": "embedding", "tied_head": tied_head_name(module, e)}
    p = f"{prefix}." if prefix else ""
    return {p + k: v for k, v in tensors.items()}, {p + k: v for k, v in layers.items()}


def write_manifest(out: str | Path, layers: dict[str, dict]) -> None:
    (Path(out) / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "layers": layers}, indent=1))


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """``model`` with its packed layers as ``out/model.safetensors``, the manifest and its config
    (a transformers config's ``config.json``, or a diffusers model's own ``save_config``)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, layers = module_tensors(model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(str(out))
    else:  # a diffusers model: its config is a FrozenDict the model writes itself
        model.save_config(str(out))
    write_manifest(out, layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def rebuild_linear(name: str, spec: dict, take, has, shape: tuple[int, ...], backend: str | None = None,
                   embedding: bool = False) -> nn.Module:
    """The packed layer ``name`` of a manifest entry ``spec``: its ``QuantLinear`` (on the backend
    recorded when this machine runs it, else ``auto``; wrapped in ``ActQuant`` for SmoothQuant's
    activations). ``take(tensor_name)`` reads a stored tensor (KeyError when absent), ``has`` says
    whether one is stored, ``shape`` is the ``[out, in]`` the model expects (ValueError otherwise)."""
    qw = QuantizedWeight(
        packing.unpack_codes(take(f"{name}.qweight"), spec["bits"]),
        take(f"{name}.scale"), take(f"{name}.zero").float(), spec["bits"], spec["group_size"],
    )
    if tuple(qw.codes.shape) != (spec["out_features"], spec["in_features"]) or tuple(shape) != tuple(qw.codes.shape):
        raise ValueError(f"codes {tuple(qw.codes.shape)}, layer {tuple(shape)}")
    bias = take(f"{name}.bias") if has(f"{name}.bias") else None
    be = backend or spec.get("backend") or "auto"
    layout = backends.Layout(qw.bits, qw.group_size, spec["in_features"], spec["out_features"])
    if be not in backends.BACKENDS or backends.BACKENDS[be].unsupported(layout, is_symmetric(qw)):
        be = "auto"
    if embedding and be not in ROW_LOCAL:
        be = "auto"
    if embedding and be == "auto":
        be = backends.auto(layout, is_symmetric(qw), row_local=True).name
    layer = QuantLinear(qw, bias, be)
    return ActQuant(layer, spec["act_bits"]) if spec.get("act_bits") else layer


def load_quantized(path: str | Path, backend: str | None = None, bare: bool = False) -> nn.Module:
    """Rebuild the model from its config (``bare``: without an LM head, as ``AutoModel`` builds a
    ViT), install QuantLinear layers, load the tensors.

    The model is built with its parameters on the meta device and each tensor is read from the
    files into its own memory once (one file or a sharded folder), so loading needs about the
    checkpoint's size, not the fp32 model's (a 7B model packed to int4 loads in ~4 GB).
    backend: None = the backend recorded for each layer when this machine runs it, else ``auto``.
    """
    from ..formats.tensorfiles import INDEX, TensorIndex
    from .meta import skeleton
    from transformers import AutoConfig

    path = Path(path)
    man = read_quant_manifest(path)
    if not (path / INDEX).is_file() and not (path / "model.safetensors").is_file():
        raise LeanfmError(f"checkpoint {path} has no model.safetensors; the checkpoint is incomplete: {REWRITE_HINT}")
    index = TensorIndex(path)  # every file's header checked before the (slower) model build
    config = AutoConfig.from_pretrained(str(path))
    model = skeleton(config, bare)
    fix = f"the checkpoint is damaged: {REWRITE_HINT}"
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in index:
            raise KeyError(name)
        used.add(name)
        return index.read(name)

    compact = _compact_input_embedding(model, config, man, index, used)
    install_packed_layers(model, path, man, take, lambda n: n in index, backend)
    tensors = {n: index.read(n, torch.float32 if index.dtype(n).is_floating_point else None) for n in index.names() if n not in used}
    tensors.update(compact)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # a shape mismatch
        raise LeanfmError(f"quantized checkpoint {path} does not match its config.json ({' '.join(str(e).split())[:200]}); {fix}") from None
    del tensors
    heads = [sp["tied_head"] for sp in man["layers"].values() if sp.get("tied_head")]
    qnames = tuple(n + "." for n in [*man["layers"], *heads])
    missing = [k for k in missing if not k.startswith(qnames)]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        if "lm_head" not in man["layers"] and not heads:
            model.tie_weights()
    missing = [k for k in missing if _still_meta(model, k)]  # buffers the config rebuilds (rotary tables) are not stored
    if missing or unexpected:
        raise LeanfmError(f"quantized checkpoint {path} does not match its config: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    from .fuse import fuse_shared_inputs

    fuse_shared_inputs(model.eval())
    return model


def install_packed_layers(model: nn.Module, path: Path, man: dict, take, has, backend: str | None = None) -> None:
    """Put each layer the manifest ``man`` of the checkpoint folder ``path`` names into ``model``
    (built with its parameters on the meta device): its ``QuantLinear`` (``rebuild_linear``), or a
    ``QuantEmbedding`` for an embedding entry. ``take``/``has`` read the stored tensors as in
    ``rebuild_linear``. One-line errors name the layer and the file when they do not match."""
    fix = f"the checkpoint is damaged: {REWRITE_HINT}"
    for name, spec in man["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LeanfmError(f"{path / MANIFEST} names layer '{name}', which the model in {path / 'config.json'} does not have; {fix}") from None
        embedding = spec.get("kind") == "embedding"
        if not isinstance(old, nn.Embedding if embedding else nn.Linear):
            if embedding:
                raise LeanfmError(f"{path / MANIFEST} names embedding '{name}', which is a {type(old).__name__}, not an embedding; {fix}")
            raise LeanfmError(f"{path / MANIFEST} names layer '{name}', which is a {type(old).__name__}, not a linear layer; {fix}")
        try:
            layer = rebuild_linear(name, spec, take, has, tuple(old.weight.shape), backend, embedding)
        except KeyError as e:
            raise LeanfmError(f"quantized checkpoint {path} lacks tensor {e.args[0]}; the file is incomplete: {REWRITE_HINT}") from None
        except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
            raise LeanfmError(f"{path / 'model.safetensors'}: the tensors of layer '{name}' do not match its entry in {MANIFEST} "
                              f"(bits {spec['bits']}, group_size {spec['group_size']}: {' '.join(str(e).split())[:160]}); {fix}") from None
        if embedding:
            scale = getattr(old, "embed_scale", None)
            set_module(model, name, QuantEmbedding(layer, None if scale is None else float(scale), old.padding_idx))
            if spec.get("tied_head"):
                set_module(model, spec["tied_head"], layer)
        else:
            set_module(model, name, layer)
        trim_heap()  # the unpacked codes were transients between kept buffers: give their pages back


def _compact_input_embedding(model: nn.Module, config, man: dict, index, used: set[str]) -> dict[str, torch.Tensor]:
    """Hold an untied float input embedding in bf16 when that loses nothing, upcasting its output.

    A table is only ever read by row, so keeping it as bf16 and returning fp32 rows gives the same
    numbers as the fp32 table whenever every value is a bf16 value: true of any model trained or
    shipped in bf16 (Llama, Qwen, SmolLM) that leanfm upcast for its fp32 math. It halves the
    largest float tensor of a packed checkpoint: 0.4 of 0.8 GB for a Llama-2-7B-sized table with a
    49k vocabulary, which an int4 7B needs to stay within 6 GB in ``leanfm eval``. A tied table
    (the head's weight too) stays fp32: the head's GEMM runs in fp32. Read first, while little
    else is in memory."""
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # a model of two towers (CLIPModel) has no one input table
        emb = None
    if type(emb) is not nn.Embedding or getattr(config, "tie_word_embeddings", False):
        return {}
    key = next((n + ".weight" for n, m in model.named_modules() if m is emb), None)
    if key is None or key[: -len(".weight")] in man["layers"] or key not in index or not index.dtype(key).is_floating_point:
        return {}
    w = index.read(key)
    if w.dtype == torch.float32:
        half = w.to(torch.bfloat16)
        if not torch.equal(half.float(), w):
            return {}  # values bf16 cannot hold: keep the fp32 table (read again with the rest)
        w = half
    elif w.dtype not in (torch.bfloat16,):
        return {}
    used.add(key)
    emb.register_forward_hook(lambda mod, args, out: out.float())
    emb.leanfm_compact = "bfloat16 table, fp32 rows (exact)"
    return {key: w}


def _still_meta(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    t = mod._parameters.get(leaf, mod._buffers.get(leaf))
    return t is None or t.is_meta
