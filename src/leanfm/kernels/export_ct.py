"""Export leanfm-quantized weights as a compressed-tensors checkpoint (the format vLLM reads).

A checkpoint is a plain Hugging Face directory whose ``config.json`` carries a
``quantization_config`` block with ``"quant_method": "compressed-tensors"``. Weights are written in
the ``pack-quantized`` format, used here for both int4 and int8 weight-only quantization ("W4A16",
"W8A16"). For each quantized ``nn.Linear`` called ``NAME`` the safetensors file holds, instead of
``NAME.weight``:

- ``NAME.weight_packed``: int32 ``[out, ceil(in * bits / 32)]``. Signed integers ``q`` in
  ``[-2^(b-1), 2^(b-1) - 1]`` are offset by ``+2^(b-1)`` (so they become leanfm's unsigned codes)
  and packed ``32 // bits`` per int32 along the input dimension, element ``j`` of a word in bits
  ``[j*b, (j+1)*b)`` (little end first). For 2, 4 and 8 bits this layout is the same in every
  compressed-tensors release.
- ``NAME.weight_scale``: float ``[out, in // group_size]`` ("group" strategy) or ``[out, 1]``
  ("channel" strategy, one group spanning the whole row).
- ``NAME.weight_zero_point`` (asymmetric schemes only): the signed zero points ``z - 2^(b-1)``,
  offset and packed the same way but along the *output* dimension: int32
  ``[ceil(out * bits / 32), n_groups]``. Symmetric schemes store no zero point (it is 0).
- ``NAME.weight_shape``: int64 ``[2]``, the unpacked ``[out, in]``.

The dequantized weight is ``scale * (q - zp)``, which equals leanfm's ``scale * (codes - zero)``
exactly, since ``q - zp == codes - zero``. Scales are written as float32, which compressed-tensors
accepts (it creates the scale parameter in the model's dtype, so loading in float32 is bit-exact;
loading in bf16/fp16, as vLLM does for a bf16 model, rounds the scales to that dtype).

The ``quantization_config`` block names one config group per distinct scheme (bits, strategy,
group size, symmetry). With one scheme the group targets ``["Linear"]`` and every Linear left in
full precision (e.g. ``lm_head``) is listed in ``ignore``; with several, each group targets its
modules by exact name. ``quantization_status`` is ``"compressed"``, ``format`` is
``"pack-quantized"``.

Layouts that cannot be expressed portably raise :class:`LeanfmError`: 3/5/6/7-bit codes (their
int32 packing changed between compressed-tensors releases, padded vs dense, so a reader could
misread them silently) and a quantized ``lm_head`` tied to the input embeddings.

Writing needs only torch, safetensors and transformers (to enumerate the model's modules on the
meta device); compressed-tensors is needed only to *read* the checkpoint. Verified to reload to
identical logits with :data:`VERIFIED_WITH` (``AutoModelForCausalLM.from_pretrained``: on CPU,
transformers first builds the compressed modules, with ``weight_packed`` etc., and
compressed-tensors decompresses them to dense float weights on the first forward pass).
Symmetric exports also reload with compressed-tensors 0.15 to 0.20. Asymmetric ones reload by
default only up to 0.17.1: 0.18.0 to 0.20.0 build an unpacked ``weight_zero_point`` placeholder and
reject the packed one that compressed-tensors itself writes (a size mismatch). With those versions,
pass ``quantization_config=CompressedTensorsConfig(dequantize=True)`` to load, which works for
single-scheme exports only: transformers 5.23 applies the first config group's scheme to every
layer on that route.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LeanfmError
from ..formats.quantized import QuantizedWeight
from .meta import tied_aliases

VERIFIED_WITH = {"compressed-tensors": "0.17.1", "transformers": "5.23.0", "torch": "2.13.0"}
FORMAT = "pack-quantized"
SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True, order=True)
class CTScheme:
    """The weight quantization arguments of one compressed-tensors config group."""

    bits: int
    strategy: str  # "group" or "channel"
    group_size: int | None  # None for "channel"
    symmetric: bool

    def weights_args(self) -> dict:
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "dynamic": False,
        }


def _check(name: str, qw: QuantizedWeight) -> None:
    codes, scale, zero = qw.codes, qw.scale, qw.zero
    if qw.bits not in SUPPORTED_BITS:
        raise LeanfmError(
            f"{name}: {qw.bits}-bit weights cannot be exported to compressed-tensors portably "
            f"(its int32 packing of 3/5/6/7-bit codes differs between releases); use 2, 4 or 8 bits"
        )
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise LeanfmError(f"{name}: codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    out, inf = codes.shape
    gs = qw.group_size
    if gs <= 0 or inf % gs:
        raise LeanfmError(f"{name}: group_size {gs} does not divide in_features {inf}")
    expect = (out, inf // gs)
    if tuple(scale.shape) != expect or tuple(zero.shape) != expect:
        raise LeanfmError(
            f"{name}: scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must both be {expect}"
        )
    maxq = 2**qw.bits - 1
    if codes.numel() and int(codes.max()) > maxq:
        raise LeanfmError(f"{name}: a code exceeds {maxq}, the largest {qw.bits}-bit code")
    if not torch.equal(zero, zero.round()) or float(zero.min()) < 0 or float(zero.max()) > maxq:
        raise LeanfmError(f"{name}: zero points must be integers in 0..{maxq}")
    if not torch.isfinite(scale).all():
        raise LeanfmError(f"{name}: scale has non-finite values")


def scheme_of(qw: QuantizedWeight) -> CTScheme:
    """The compressed-tensors scheme that expresses ``qw`` exactly."""
    inf = qw.codes.shape[1]
    symmetric = bool((qw.zero == 2 ** (qw.bits - 1)).all())
    if qw.group_size == inf:
        return CTScheme(qw.bits, "channel", None, symmetric)
    return CTScheme(qw.bits, "group", qw.group_size, symmetric)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned ``bits``-bit values (any integer dtype, 2-D) -> int32 words along ``dim`` (0 or 1).

    ``32 // bits`` values per word, value ``j`` of a word in bits ``[j*bits, (j+1)*bits)``; the
    last word is zero-padded. Matches compressed-tensors' ``pack_to_int32`` after its offset.
    """
    if 32 % bits:
        raise LeanfmError(f"int32 packing here supports 1, 2, 4 or 8 bits, not {bits}")
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.t()
    per_word = 32 // bits
    rows, cols = v.shape
    words = math.ceil(cols / per_word)
    v = torch.nn.functional.pad(v, (0, words * per_word - cols)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (v << shifts).sum(dim=-1)  # 0 .. 2^32 - 1
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``length`` unsigned values along ``dim``, as uint8."""
    v = packed.to(torch.int64)
    if dim == 0:
        v = v.t()
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    out = ((v.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(v.shape[0], -1)[:, :length]
    out = out.to(torch.uint8)
    return (out.t() if dim == 0 else out).contiguous()


def compress_weight(qw: QuantizedWeight, scheme: CTScheme) -> dict[str, torch.Tensor]:
    """The per-module tensors (local names) of one pack-quantized Linear weight."""
    out = {
        "weight_packed": pack_int32(qw.codes, qw.bits, dim=1),
        "weight_scale": qw.scale.to(torch.float32).contiguous(),
        "weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64),
    }
    if not scheme.symmetric:
        out["weight_zero_point"] = pack_int32(qw.zero.round().to(torch.int64), qw.bits, dim=0)
    return out


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except Exception as e:  # unknown architecture, broken config
        raise LeanfmError(
            f"cannot build a {type(config).__name__} causal LM to check the export against: {e}"
        ) from e


def quantization_config_block(groups: dict[CTScheme, list[str]], ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of ``config.json``."""
    single = len(groups) == 1
    config_groups = {}
    for i, (scheme, names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": scheme.weights_args(),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": VERIFIED_WITH["compressed-tensors"],
    }


def export_compressed_tensors(
    config,
    state_dict: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedWeight],
    out_dir,
    tokenizer=None,
) -> Path:
    """Write a compressed-tensors (``pack-quantized``) checkpoint to ``out_dir`` and return it.

    ``config`` is the model's Hugging Face config; ``state_dict`` holds every tensor that is not
    quantized, keyed as in the model's ``state_dict()`` (a tied ``lm_head.weight`` may be present or
    not; it is not written); ``quantized`` maps Linear module names (``model.layers.0.mlp.up_proj``)
    to their :class:`QuantizedWeight`. Writes ``model.safetensors``, ``config.json`` and, if
    given, the tokenizer's files. Raises :class:`LeanfmError` naming the first problem: an
    unsupported bit width, a name that is not a Linear of the model, a shape mismatch, a missing or
    unexpected tensor, or a quantized module that is tied to another.
    """
    from safetensors.torch import save_file

    if not quantized:
        raise LeanfmError("nothing to export: no quantized layers were given")
    model = _meta_model(config)
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    aliases = tied_aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}

    groups: dict[CTScheme, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        if name not in linears:
            raise LeanfmError(f"{name!r} is not a Linear module of this {config.model_type} model")
        wkey = f"{name}.weight"
        if wkey in aliases or wkey in aliases.values():
            raise LeanfmError(
                f"{name} shares its weight with another module (tie_word_embeddings); "
                f"leave it unquantized or untie it first"
            )
        _check(name, qw)
        want = tuple(modules[name].weight.shape)
        if tuple(qw.codes.shape) != want:
            raise LeanfmError(f"{name}: codes have shape {tuple(qw.codes.shape)}, the model expects {want}")
        scheme = scheme_of(qw)
        groups.setdefault(scheme, []).append(name)
        for local, t in compress_weight(qw, scheme).items():
            tensors[f"{name}.{local}"] = t
        if wkey in state_dict:
            raise LeanfmError(f"{wkey} is quantized; remove it from state_dict")

    dense_keys = set(expected) - {f"{n}.weight" for n in quantized}
    missing = sorted(dense_keys - set(state_dict))
    if missing:
        raise LeanfmError(f"state_dict lacks {len(missing)} tensors, e.g. {missing[0]}")
    extra = sorted(set(state_dict) - dense_keys - set(aliases))
    if extra:
        raise LeanfmError(f"state_dict has {len(extra)} tensors the model does not, e.g. {extra[0]}")
    for k in sorted(dense_keys):
        t = state_dict[k]
        if tuple(t.shape) != tuple(expected[k].shape):
            raise LeanfmError(f"{k}: shape {tuple(t.shape)}, the model expects {tuple(expected[k].shape)}")
        tensors[k] = t.detach().to("cpu").contiguous().clone()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(str(out))
    path = out / "config.json"
    data = json.loads(path.read_text())
    ignore = sorted(linears - set(quantized))
    data["quantization_config"] = quantization_config_block(groups, ignore)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
