"""Model-family quirks, kept in one place. Everything else walks modules generically."""
from __future__ import annotations

from torch import nn

# Families whose perplexity must be measured with BOS at the start of every window: Gemma was
# trained with BOS always present (GUIDE section 5: ppl 24 with BOS vs 61 without).
_BOS_FAMILIES = ("gemma",)


def needs_bos(model: nn.Module) -> bool:
    mt = str(getattr(model.config, "model_type", ""))
    return mt.startswith(_BOS_FAMILIES)


def max_context(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def decoder_config(model: nn.Module):
    """The text config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
