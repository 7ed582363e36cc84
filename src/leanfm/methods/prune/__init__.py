"""Weight pruning: unstructured and semi-structured (N:M) sparsity (magnitude, Wanda, SparseGPT).

:mod:`.decl` declares the methods (configs, no torch); pure math lives in :mod:`.masks` and
:mod:`.sparsegpt_math`; :mod:`.sparsity` holds the handlers. Pruned weights stay in the dense
fp32 ``nn.Linear`` (zeros in a dense matrix), so every pruning step reports ``simulated: true``.

Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from .. import lazy_exports

_EXPORTS = {"MagnitudeConfig": "decl", "PruneConfig": "decl", "SparseGPTConfig": "decl", "WandaConfig": "decl"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
