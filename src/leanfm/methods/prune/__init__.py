"""Weight pruning: unstructured and semi-structured (N:M) sparsity (magnitude, Wanda, SparseGPT).

:mod:`.decl` declares the methods (configs, no torch); pure math lives in :mod:`.masks` and
:mod:`.sparsegpt_math`; :mod:`.sparsity` holds the handlers. Pruned weights stay in the dense
fp32 ``nn.Linear`` (zeros in a dense matrix), so every pruning step reports ``simulated: true``.

Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from importlib import import_module

_EXPORTS = {"MagnitudeConfig": "decl", "PruneConfig": "decl", "SparseGPTConfig": "decl", "WandaConfig": "decl"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
