"""embed_quant: the token embedding table as integer codes, shared with a tied LM head.

The math is RTN on a group grid (:mod:`.grid`); :class:`~leanfm.kernels.qembedding.QuantEmbedding`
gathers and dequantizes rows at lookup.
"""
from __future__ import annotations

from torch import nn

from ...errors import LeanfmError
from ...formats.layout import Layout
from ...kernels import backends as B
from ...kernels.modules import set_module
from ...kernels.qembedding import QuantEmbedding
from ...kernels.qlinear import QuantLinear, is_symmetric
from .decl import EmbedQuantConfig
from .grid import grid_quantize, resolve_group_size


def embedding_names(model: nn.Module) -> tuple[str, str | None, bool]:
    """(name of the input embedding, name of the output head or None, whether they are tied)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    if isinstance(emb, QuantEmbedding):
        raise LeanfmError("the token embedding is already quantized (embed_quant ran before); keep one embed_quant step")
    if not isinstance(emb, nn.Embedding):
        raise LeanfmError(f"embed_quant needs an nn.Embedding input table; this model's is a {type(emb).__name__}")
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    return names[id(emb)], (names.get(id(head)) if head is not None else None), tied


def _backend(cfg: EmbedQuantConfig, lay: Layout, symmetric: bool) -> str:
    if cfg.backend != "auto":
        why = B.get(cfg.backend).unsupported(lay, symmetric)
        if why:
            raise LeanfmError(f"embed_quant backend {cfg.backend}: {why}")
        return cfg.backend
    return B.auto(lay, symmetric, row_local=True).name


def apply_embed_quant(model: nn.Module, cfg: EmbedQuantConfig, calib=None) -> dict:
    emb_name, head_name, tied = embedding_names(model)
    emb = model.get_input_embeddings()
    w = emb.weight.detach().float()
    resolve_group_size(w.shape[1], cfg.group_size, emb_name)
    qw = grid_quantize(w, cfg.bits, cfg.group_size, cfg.symmetric)
    lay = Layout(qw.bits, qw.group_size, w.shape[1], w.shape[0])
    table = QuantLinear(qw, None, _backend(cfg, lay, is_symmetric(qw)))
    scale = getattr(emb, "embed_scale", None)
    scale = None if scale is None else float(scale)
    set_module(model, emb_name, QuantEmbedding(table, scale, emb.padding_idx))
    if tied:  # the head becomes the same packed table: one copy of the codes
        set_module(model, head_name, table)
    return {"simulated": False, "kernel": f"{table.backend.kernel} [{table.backend.name}: embedding table"
            f"{' + tied lm_head' if tied else ''}]", "layers": 1 + int(tied), "tied_head": tied}
