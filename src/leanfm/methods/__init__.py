"""Technique implementations. Importing this package registers every built-in method."""
from .quantize import awq, gptq, hqq, rtn, smoothquant  # noqa: F401
from .prune import sparsity  # noqa: F401
from .structured import layerdrop, width  # noqa: F401
from .lowrank import lowrank  # noqa: F401
