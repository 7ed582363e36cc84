"""Structured pruning: remove whole decoder layers (``layerdrop``) or attention-head groups and
MLP channels (``width``). Both shrink the tensors and the Hugging Face config, so the result is a
plain, smaller checkpoint that reloads with ``transformers.AutoModelForCausalLM.from_pretrained``.

:mod:`.decl` declares the methods (configs, no torch); :mod:`.layerdrop` and :mod:`.width` hold
the handlers. Names are imported on first use (PEP 562), so importing the package loads no torch.
"""
from .. import lazy_exports

_EXPORTS = {"LayerDropConfig": "decl", "WidthPruneConfig": "decl"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
