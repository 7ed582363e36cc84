"""Model sources: packaged aliases, Hugging Face hub ids and local directories."""
from .load import load  # noqa: F401
from .registry import ALIASES, DEFAULT_MODEL  # noqa: F401
