"""Technique implementations. Importing this package registers every built-in method."""
from .quantize import gptq, hqq, rtn  # noqa: F401
