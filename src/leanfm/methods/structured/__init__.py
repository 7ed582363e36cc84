"""Structured pruning: remove whole decoder layers (``layerdrop``) or attention-head groups and
MLP channels (``width``). Both shrink the tensors and the Hugging Face config, so the result is a
plain, smaller checkpoint that reloads with ``transformers.AutoModelForCausalLM.from_pretrained``.

:mod:`.decl` declares the methods (configs, no torch); :mod:`.layerdrop` and :mod:`.width` hold
the handlers. Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from importlib import import_module

_EXPORTS = {"LayerDropConfig": "decl", "WidthPruneConfig": "decl"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
