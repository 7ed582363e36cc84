"""Model sources: packaged aliases, Hugging Face hub ids and local directories.

``load`` is imported on first use, so reading the registry (the CLI's parser) needs no torch.
"""
from .registry import ALIASES, DEFAULT_MODEL  # noqa: F401


def __getattr__(name: str):
    if name == "load":
        from .load import load

        return load
    raise AttributeError(f"module 'leanfm.models' has no attribute '{name}'")
