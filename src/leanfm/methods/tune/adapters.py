"""peft and bitsandbytes glue: LoRA/DoRA adapters, the 4-bit QLoRA base, merging, sparsity masks.

The adapters are peft's (``LoraConfig``, ``get_peft_model``); the 4-bit base is bitsandbytes'
``Linear4bit`` (NF4 or FP4, quantized on the CPU). Merging is done here rather than with peft's
``merge_and_unload`` because peft re-quantizes a merged 4-bit layer (QLoRA's result would lose
the update to rounding); here every adapted layer becomes a plain float ``nn.Linear`` holding
W' = W + ΔW (LoRA) or m / ‖W + ΔW‖_row · (W + ΔW) (DoRA, Liu et al. 2024, eq. 5), with W the
dequantized base for QLoRA.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ...errors import LeanfmError
from ...models.mapped import copy_out_of_mapped_files

INSTALL = "pip install 'leanfm[tune]'"  # peft and bitsandbytes at the versions leanfm pins


def require(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise LeanfmError(f"this tuning method needs {package}, which is not installed; install it with: {INSTALL}") from None


def linear_names(model: nn.Module) -> list[str]:
    """Short names of the model's linear modules (what ``targets`` may name), in model order."""
    seen: dict[str, None] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit":
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def check_targets(model: nn.Module, targets) -> None:
    """One line when ``targets`` matches no linear module, listing the names it could use."""
    names = linear_names(model)
    if list(targets) == ["all-linear"]:
        return
    full = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"]
    for t in targets:
        if not any(n == t or n.endswith("." + t) or fnmatch.fnmatch(n, t) for n in full):
            raise LeanfmError(f"LoRA target '{t}' matches no linear module of this model; use all-linear or some of: "
                              f"{', '.join(names)}")


def _peft_targets(targets) -> str | list[str]:
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)


def quantize_base_4bit(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Replace every decoder linear (not the LM head) by a bitsandbytes 4-bit ``Linear4bit``
    holding the same weights; returns how many. peft then wraps them as QLoRA layers."""
    bnb = require("bitsandbytes")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
            q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quant_type)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
            setattr(parent, cname, q.to("cpu"))  # .to() quantizes
            del child
            n += 1
    model.is_loaded_in_4bit = True  # peft wraps Linear4bit as its QLoRA layer only with this flag
    # what stays float still views the memory-mapped fp32 checkpoint, which keeps every page of
    # it that was read resident, the replaced linears' too (SmolLM2-135M: 0.64 GB file-backed
    # resident before, 0.12 after): give it memory of its own so the mapping goes
    copy_out_of_mapped_files(model)
    return n


def add_lora(model: nn.Module, spec: dict):
    """The peft model with LoRA (or DoRA) adapters per ``spec`` (rank, lora_alpha, dropout,
    targets, dora); every other weight frozen."""
    peft = require("peft")
    check_targets(model, spec["targets"])
    cfg = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["dropout"],
                          target_modules=_peft_targets(spec["targets"]), use_dora=spec["dora"], bias="none")
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:  # peft's own refusal (e.g. a target it cannot wrap), in one line
        raise LeanfmError(f"peft could not add the adapters: {' '.join(str(e).split())[:300]}") from None


def make_trainable(model: nn.Module, mode: str, lora_rank: int = 16, targets: tuple[str, ...] = ("all-linear",)):
    """``model`` ready to train for a distributed run: every weight (``full``), or LoRA adapters of
    ``lora_rank`` (alpha 2r) on the linears ``targets`` names (peft's ``target_modules``;
    ``all-linear``: every linear but the head) over a frozen base (any other mode)."""
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    return add_lora(model, {"rank": lora_rank, "lora_alpha": 2.0 * lora_rank, "dropout": 0.0,
                            "targets": list(targets), "dora": False})


def _dequantized(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(base).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    else:
        w = base.weight.data.float()
    return w, (base.bias.data.float() if base.bias is not None else None)


@torch.no_grad()
def merged_linear(layer) -> nn.Linear:
    """A plain ``nn.Linear`` computing what the peft LoRA/DoRA ``layer`` computes (dropout off)."""
    base = layer.get_base_layer()
    w, b = _dequantized(base)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        delta = layer.get_delta_weight(name).float()
        if name in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: magnitude times unit direction per row
            merged = w + delta
            norm = torch.linalg.norm(merged, dim=1)
            w = (layer.lora_magnitude_vector[name].weight.float() / norm).view(-1, 1) * merged
        else:
            w = w + delta
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    out.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b, requires_grad=False)
    return out


def merge(peft_model) -> nn.Module:
    """The underlying model with every adapter merged and every 4-bit base layer dequantized:
    plain float linears only, loadable by transformers."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, cname, merged_linear(child))
            elif type(child).__name__ == "Linear4bit":
                w, b = _dequantized(child)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                lin.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    lin.bias = nn.Parameter(b, requires_grad=False)
                setattr(parent, cname, lin)
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sparsity_masks(model: nn.Module, min_zeros: float = 0.1) -> dict[str, torch.Tensor]:
    """Masks (True: trainable) of the linear weights that a pruning step zeroed: those with at
    least ``min_zeros`` exact zeros (a trained dense weight has essentially none)."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.is_floating_point():
            nz = m.weight.data != 0
            if 1 - nz.float().mean().item() >= min_zeros:
                masks[name] = nz
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        mods[name].weight.data.mul_(mask)
