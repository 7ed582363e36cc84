"""``QuantEmbedding``: a token embedding whose table is a packed integer weight.

The table is a :class:`~.qlinear.QuantLinear` of shape ``[vocab, hidden]`` (one row per token);
a lookup gathers the rows of its buffers it needs and dequantizes just those, so a decode step
touches ``hidden`` codes per token, not the table. Only backends whose buffers keep each row
whole can be gathered this way (``formats.layout.ROW_LOCAL``). When the LM head is tied to the
embedding, the model's ``lm_head`` is the same ``QuantLinear`` object: one copy of the codes
serves the lookup and the head's integer GEMV, as the tied fp32 matrix did.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.layout import ROW_LOCAL, Layout
from .qlinear import QuantLinear


class QuantEmbedding(nn.Module):
    def __init__(self, table: QuantLinear, embed_scale: float | None = None, padding_idx: int | None = None):
        super().__init__()
        if table.backend.name not in ROW_LOCAL:
            from ..errors import LeanfmError

            raise LeanfmError(f"backend {table.backend.name} tiles rows together, so an embedding lookup cannot gather them; "
                              f"use one of {', '.join(ROW_LOCAL)}")
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.embed_scale = embed_scale  # Gemma multiplies looked-up rows by sqrt(hidden)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        t = self.table
        rows = {k: v.index_select(0, flat) for k, v in t._bufs().items()}
        lay = Layout(t.layout.bits, t.layout.group_size, t.in_features, flat.numel())
        out = t.backend.dequantize(rows, lay).view(*ids.shape, t.in_features)
        return out if self.embed_scale is None else out * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.table.bits}, group={self.table.group_size}, backend={self.table.backend.name}"
