"""Weight pruning: unstructured and semi-structured (N:M) sparsity (magnitude, Wanda, SparseGPT).

Pure math lives in :mod:`.masks` and :mod:`.sparsegpt_math`; :mod:`.sparsity` holds the configs
and the registered handlers. Pruned weights stay in the dense fp32 ``nn.Linear`` (zeros in a
dense matrix), so every pruning step reports ``simulated: true``.
"""
from .sparsity import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig  # noqa: F401
