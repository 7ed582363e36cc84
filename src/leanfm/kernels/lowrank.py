"""``LowRankLinear`` and a small checkpoint format for factorized models.

A factorized model's ``state_dict`` names each replaced layer's factors ``NAME.a.weight``
(``[r, in]``) and ``NAME.b.weight`` / ``NAME.b.bias`` (``[out, r]``, the original bias).
Plain transformers cannot rebuild that structure, so :func:`save_lowrank` writes, next to
``config.json`` and ``model.safetensors``, a manifest ``leanfm-lowrank.json`` with each layer's
rank; :func:`load_lowrank` builds the architecture from the config, swaps in empty
``LowRankLinear`` modules of those ranks (:func:`install_layout`) and loads the tensors.
The same two steps round-trip any ``state_dict`` without leanfm's kernels.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError
from .modules import set_module

MANIFEST = "leanfm-lowrank.json"
FORMAT_VERSION = 1


class LowRankLinear(nn.Module):
    """``y = b(a(x))``: ``a`` = nn.Linear(in, rank, no bias), ``b`` = nn.Linear(rank, out, bias).

    Two real, smaller GEMMs; FLOP counters and quantizers that walk ``nn.Linear`` leaves see both."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.b = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        mod = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, dtype=a.dtype, device=a.device)
        mod.a.weight.copy_(a)
        mod.b.weight.copy_(b)
        if bias is not None:
            mod.b.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_layout(model: nn.Module) -> dict[str, dict]:
    """``{name: {in, out, rank, bias}}`` of every LowRankLinear in ``model``."""
    return {
        n: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "bias": m.b.bias is not None}
        for n, m in model.named_modules() if isinstance(m, LowRankLinear)
    }


def install_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Replace each named ``nn.Linear`` by an (uninitialized) LowRankLinear of the recorded rank."""
    for name, spec in layout.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LeanfmError(f"low-rank layout names {name}, which this model does not have") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (spec["in"], spec["out"]):
            raise LeanfmError(f"low-rank layout expects {name} to be a {spec['out']}x{spec['in']} nn.Linear")
        w = old.weight
        set_module(model, name, LowRankLinear(spec["in"], spec["out"], spec["rank"], spec["bias"], dtype=w.dtype, device=w.device))
    return model


def save_lowrank(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the ``leanfm-lowrank.json`` manifest."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"))  # tied tensors are stored once
    (out / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "layers": lowrank_layout(model)}, indent=1))
    return out


def is_lowrank_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def read_lowrank_manifest(model_dir: str | Path) -> dict:
    """``leanfm-lowrank.json`` of the folder ``model_dir``, schema-checked (one line naming the
    file and the problem when it is not valid JSON, misses keys or has wrong types)."""
    from .checkpoint import read_manifest

    return read_manifest(Path(model_dir) / MANIFEST, FORMAT_VERSION,
                         {"in": (int,), "out": (int,), "rank": (int,), "bias": (bool,)})


def load_lowrank(model_dir: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_lowrank` (fp32 unless the config says otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import REWRITE_HINT, check_safetensors

    d = Path(model_dir)
    if not is_lowrank_checkpoint(d):
        raise LeanfmError(f"{d} has no {MANIFEST}: not a leanfm low-rank checkpoint")
    manifest = read_lowrank_manifest(d)
    tensors = d / "model.safetensors"
    if not tensors.is_file():
        raise LeanfmError(f"checkpoint {d} has no model.safetensors; the checkpoint is incomplete: {REWRITE_HINT}")
    check_safetensors(tensors)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)))
    try:
        install_layout(model, manifest["layers"])
    except LeanfmError as e:  # the manifest does not fit config.json's model
        raise LeanfmError(f"{d / MANIFEST}: {e} (config.json disagrees); the checkpoint is damaged: {REWRITE_HINT}") from None
    try:
        load_model(model, str(tensors))
    except SafetensorError as e:
        raise LeanfmError(f"{tensors} is truncated or corrupt ({e}); {REWRITE_HINT}") from None
    except RuntimeError as e:  # missing/unexpected tensors or a shape that is not the manifest's rank
        raise LeanfmError(f"{tensors} does not match {d / MANIFEST} ({' '.join(str(e).split())[:200]}); "
                          f"the checkpoint is damaged: {REWRITE_HINT}") from None
    return model.eval()
