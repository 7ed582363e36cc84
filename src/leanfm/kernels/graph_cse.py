"""One packed-kernel call per fused group inside a compiled graph.

Eagerly, a fused group (q/k/v, gate/up: :mod:`.fuse`) runs its kernel once and hands each member
its slice from a Python-side cache. A traced graph keeps no Python state, so there each member
calls the fused kernel on the same input and slices its own part: three identical int4 GEMVs
for q/k/v. torch's own common-subexpression pass does not run on the graphs inductor compiles
for inference, so this pass removes the repeats: a call to a packed decode operator whose
operator and arguments equal an earlier call's in the same mutation region is replaced by that
call's result. The operators are pure (they read the input and the packed weights and write a
new tensor), so the graph computes the same values. The reshapes and dtype casts that feed only
such calls are merged first, so that the repeated calls see the same argument nodes.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_FEEDERS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._to_copy.default,
            torch.ops.prims.convert_element_type.default, torch.ops.aten.clone.default}


def _key(node: torch.fx.Node):
    def norm(a):
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, torch.fx.Node):
            return ("node", a)
        if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return a
        return ("id", id(a))

    return node.target, norm(node.args), tuple(sorted((k, norm(v)) for k, v in node.kwargs.items()))


class DedupePackedCalls(CustomGraphPass):
    """Merge repeated calls of the packed decode operators (and their input reshapes) in an FX graph."""

    def __init__(self, ops) -> None:
        self.ops = set(ops)

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._inductor.pattern_matcher import compute_mutation_region_ids

        compute_mutation_region_ids(graph)
        feeding: set[torch.fx.Node] = set()
        for n in reversed(graph.nodes):  # nodes whose every user is a packed call or feeds one
            if n.op == "call_function" and n.target in _FEEDERS and n.users and all(
                    u.target in self.ops or u in feeding for u in n.users):
                feeding.add(n)
        seen: dict = {}
        for n in list(graph.nodes):
            if n.op != "call_function" or not (n.target in self.ops or n in feeding):
                continue
            key = (n.meta.get("mutation_region_id"), _key(n))
            first = seen.get(key)
            if first is None:
                seen[key] = n
            else:
                n.replace_all_uses_with(first)
                graph.erase_node(n)

    def uuid(self):
        return (get_hash_for_files((__file__,)), tuple(sorted(str(o) for o in self.ops)))
