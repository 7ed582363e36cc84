"""Importing this module registers every built-in method (``config.lookup`` does it on first use)."""
from .quantize import awq, gptq, hqq, rtn, smoothquant  # noqa: F401
from .prune import sparsity  # noqa: F401
from .structured import layerdrop, width  # noqa: F401
from .lowrank import lowrank  # noqa: F401
from .kvcache import policies  # noqa: F401
from .decoding import policy  # noqa: F401
