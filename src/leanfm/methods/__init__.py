"""Technique implementations. Importing this package registers every built-in method."""
from .quantize import rtn  # noqa: F401
