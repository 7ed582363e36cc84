"""Route a compiled decode graph's one-row fp32 matmuls to leanfm's GEMV (:mod:`.cpp_gemv`).

After AOT autograd an ``nn.Linear`` on a ``[1, 1, K]`` decode input is ``mm(x2d, permute(W,
[1, 0]))`` (``addmm(b, x2d, permute(W))`` with a bias), ``W`` a graph input (the parameter). This
pass replaces each such node whose tensors are fp32 on the CPU, with ``W`` contiguous and at most
``cpp_gemv.MAX_ROWS`` rows of ``x``, by ``leanfm::f32_gemv(x2d, W, b)`` — the same product,
computed by a kernel that reads the weight at the memory's rate. Everything else is left to
inductor. The model is not touched: only the compiled graph changes, and only where the kernel
compiled on this machine (:class:`DecodeGraphPass` is given it or not).
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import cpp_gemv
from .graph_cse import DedupePackedCalls

aten = torch.ops.aten


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _weight_of(b) -> torch.fx.Node | None:
    """``W`` when ``b`` is ``W`` transposed (``permute(W, [1, 0])`` or ``t(W)``), else None."""
    if not isinstance(b, torch.fx.Node) or b.op != "call_function":
        return None
    if b.target is aten.permute.default and list(b.args[1]) == [1, 0]:
        return b.args[0]
    if b.target is aten.t.default:
        return b.args[0]
    return None


def _fits(x, w, bias, max_rows: int) -> bool:
    vx, vw = _val(x), _val(w)
    if not isinstance(vx, torch.Tensor) or not isinstance(vw, torch.Tensor):
        return False
    ok = (vx.dtype == vw.dtype == torch.float32 and vx.device.type == vw.device.type == "cpu"
          and vx.dim() == 2 and vw.dim() == 2 and vw.is_contiguous() and vx.shape[0] <= max_rows)
    if ok and bias is not None:
        vb = _val(bias)
        ok = isinstance(vb, torch.Tensor) and vb.dtype == torch.float32 and vb.dim() == 1 and vb.shape[0] == vw.shape[0]
    return ok


def rewrite_gemvs(graph: torch.fx.Graph, max_rows: int) -> int:
    """Replace the graph's qualifying ``mm``/``addmm`` nodes by ``leanfm::f32_gemv``; how many."""
    n_done = 0
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten.mm.default:
            bias, (x, b) = None, n.args
        elif n.target is aten.addmm.default and not n.kwargs:  # beta = alpha = 1
            bias, x, b = n.args
            if _val(bias) is None or _val(bias).dim() != 1:
                continue
        else:
            continue
        w = _weight_of(b)
        if w is None or not _fits(x, w, bias, max_rows):
            continue
        with graph.inserting_before(n):
            g = graph.call_function(torch.ops.leanfm.f32_gemv.default, (x, w, bias))
        g.meta.update(n.meta)
        n.replace_all_uses_with(g)
        graph.erase_node(n)
        if not b.users:
            graph.erase_node(b)
        n_done += 1
    return n_done


class DecodeGraphPass(CustomGraphPass):
    """The post-grad pass a compiled decode step runs: the one-row fp32 GEMV rewrite (when
    ``gemv_rows`` > 0) and then :class:`.graph_cse.DedupePackedCalls` over the packed operators.
    ``rewrites`` counts the GEMVs rewritten in graphs this process compiled (a graph inductor
    takes from its cache is not rewritten again: it already was)."""

    def __init__(self, ops, gemv_rows: int) -> None:
        self.dedupe, self.gemv_rows, self.rewrites = DedupePackedCalls(ops), gemv_rows, 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.gemv_rows:
            self.rewrites += rewrite_gemvs(graph, self.gemv_rows)
        self.dedupe(graph)

    def uuid(self):
        return (get_hash_for_files((__file__, cpp_gemv.__file__)), self.dedupe.uuid(), self.gemv_rows)
