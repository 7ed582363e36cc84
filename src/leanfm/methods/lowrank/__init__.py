"""Low-rank factorization: each target ``nn.Linear`` (out x in) becomes two smaller ones,
in -> r -> out (:class:`.module.LowRankLinear`), by plain truncated SVD (``svd``) or
activation-aware SVD (``asvd``). Declarations (configs, no torch) in :mod:`.decl`, math in
:mod:`.svd_math`, handlers in :mod:`.lowrank`.

Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from importlib import import_module

_EXPORTS = {"ASVDConfig": "decl", "SVDConfig": "decl"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
