"""Low-rank factorization: each target ``nn.Linear`` (out x in) becomes two smaller ones,
in -> r -> out (:class:`leanfm.kernels.lowrank.LowRankLinear`), by plain truncated SVD
(``svd``) or activation-aware SVD (``asvd``). Declarations (configs, no torch) in
:mod:`.decl`, math in :mod:`.svd_math`, handlers in :mod:`.lowrank`.

Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from .. import lazy_exports

_EXPORTS = {"ASVDConfig": "decl", "SVDConfig": "decl"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
