"""Module-tree helpers shared by the kernels' loaders, the model families and the methods that swap layers."""
from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``model`` (replacing what was there)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def held_bytes(*modules: nn.Module) -> int:
    """Storage bytes of the modules' parameters and buffers as held now, shared (tied) storage counted once."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total
