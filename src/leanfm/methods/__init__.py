"""Technique implementations. Importing this package registers every built-in method."""
from .quantize import awq, gptq, hqq, rtn, smoothquant  # noqa: F401
