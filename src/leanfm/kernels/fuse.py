"""Input-sharing fusion: one packed kernel call for sibling linears that read the same tensor.

In a decoder layer q/k/v read the same normed hidden state, and so do an MLP's gate and up.
At decode time each packed GEMV costs a fixed overhead (Python dispatch, a bf16 cast of the
activations, the kernel launch) comparable to its arithmetic, so concatenating the siblings'
packed weights along ``out_features`` and calling the kernel once cuts that overhead from
seven calls per layer to four — the same QKV / gate-up fusion that GPU serving engines do.

Which linears share an input is found by running one two-token forward with hooks and grouping
the ``QuantLinear`` siblings that received the *same tensor object* — no per-family name table.
At run time each member is a :class:`FusedSlice` with no weights of its own: the first member
called with a tensor runs the fused kernel and caches the split outputs; the others return
their slice when called with that same, unmodified tensor (identity plus torch's version
counter), else the fused kernel runs again, so results are always those of the fused weights.

The stored checkpoint format is unchanged: :meth:`FusedSlice.quantized_weight` gives back each
member's own codes, so ``save_quantized`` and the compressed-tensors export see separate layers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..allocator import trim_heap
from ..formats.quantized import QuantizedWeight
from . import backends as B
from .qlinear import LayoutInfo, QuantLinear, is_symmetric


class FusedGroup(nn.Module):
    """Holds the concatenated packed weights of a group of linears (not saved in state dicts)."""

    def __init__(self, members: list[QuantLinear], fused: QuantLinear):
        super().__init__()
        self.fused = fused
        self.sizes = [m.out_features for m in members]
        self._x: torch.Tensor | None = None
        self._ver = None
        self._ys: list[torch.Tensor | None] = []  # outputs not yet handed to their member
        self._left = 0

    @staticmethod
    def _version(x: torch.Tensor):
        return None if x.is_inference() else x._version

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A traced graph holds no Python state: each member calls the fused kernel on the same
            # input, and the graph's common-subexpression pass keeps one call (a pure operator).
            return self.fused(x).split(self.sizes, dim=-1)[i]
        ys = self._ys
        if x is not self._x or not ys or ys[i] is None or self._version(x) != self._ver:
            ys = list(self.fused(x).split(self.sizes, dim=-1))
            self._x, self._ver, self._left = x, self._version(x), len(ys)
        y, ys[i] = ys[i], None
        self._left -= 1
        if self._left == 0:  # every member served: drop the references
            self._x, ys = None, []
        self._ys = ys
        return y


class FusedSlice(LayoutInfo, nn.Module):
    """Stands in for one member of a :class:`FusedGroup`; holds only its bias."""

    def __init__(self, group: FusedGroup, index: int, member: QuantLinear):
        super().__init__()
        object.__setattr__(self, "_group", group)  # a plain reference: the group is registered on the parent
        self.index = index
        self.in_features, self.out_features = member.in_features, member.out_features
        self.layout = member.layout
        self.bias = member.bias

    @property
    def backend(self):
        return self._group.fused.backend

    def _rows(self) -> slice:
        start = sum(self._group.sizes[: self.index])
        return slice(start, start + self.out_features)

    def quantized_weight(self) -> QuantizedWeight:
        q, r = self._group.fused.quantized_weight(), self._rows()
        return QuantizedWeight(q.codes[r].contiguous(), q.scale[r].contiguous(), q.zero[r].contiguous(), q.bits, q.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        return self._group.fused.dequantized_weight()[self._rows()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._group.output(self.index, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, fused slice {self.index} of {self._group.sizes}"


def _probe_inputs(model: nn.Module, dev) -> dict | None:
    """A tiny forward's inputs: two tokens for a model that takes ``input_ids``, a 2x2-patch image
    for one that takes ``pixel_values`` (a ViT), both for one that takes both (CLIP, a dual
    encoder: both towers run); None for anything else."""
    import inspect

    params = inspect.signature(model.forward).parameters
    inputs: dict = {}
    if "input_ids" in params:
        inputs["input_ids"] = torch.zeros(1, 2, dtype=torch.long, device=dev)
        if "use_cache" in params:
            inputs["use_cache"] = False
    cfg = getattr(model, "config", None)
    vcfg = getattr(cfg, "vision_config", None) or getattr(getattr(model, "vision_model", None), "config", None) or cfg
    if "pixel_values" in params and isinstance(getattr(vcfg, "patch_size", None), int):
        side = 2 * vcfg.patch_size
        inputs["pixel_values"] = torch.zeros(1, getattr(vcfg, "num_channels", 3), side, side, device=dev)
        if "interpolate_pos_encoding" in params:  # CLIP: position embeddings sized for the small probe
            inputs["interpolate_pos_encoding"] = True
    return inputs or None


def _shared_input_groups(model: nn.Module, candidates: dict[str, QuantLinear]) -> list[list[str]]:
    """Names of candidates that received the same input tensor in a tiny forward."""
    seen: dict[str, torch.Tensor] = {}
    dev = next(model.parameters()).device
    inputs = _probe_inputs(model, dev)
    if inputs is None:
        return []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0])) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    for n, x in seen.items():
        for g in groups:
            if seen[g[0]] is x:
                g.append(n)
                break
        else:
            groups.append([n])
    return [g for g in groups if len(g) > 1]


def _same_layout(ms: list[QuantLinear]) -> bool:
    """One grid (bits, group size) and one input width: the members can share one fused kernel call."""
    a = ms[0]
    return all(m.layout.bits == a.layout.bits and m.layout.group_size == a.layout.group_size and m.in_features == a.in_features for m in ms)


def _concat_packed(ms: list[QuantLinear]) -> QuantLinear | None:
    """The members' buffers concatenated along the output rows, where their one backend keeps
    every buffer row-first with the same dtypes: exact, and no unpacked codes in memory (unpacking
    a 7B layer's gate/up to concatenate them took ~0.5 GB at once)."""
    a = ms[0]
    be, bufs = a.backend, [m._bufs() for m in ms]
    if not be.rows_first or any(m.backend is not be or list(b) != list(bufs[0]) for m, b in zip(ms, bufs)):
        return None
    if not _same_layout(ms):
        return None
    if any(b[k].dtype != bufs[0][k].dtype or b[k].shape[1:] != bufs[0][k].shape[1:] for b in bufs for k in b):
        return None
    lay = B.Layout(a.bits, a.group_size, a.in_features, sum(m.out_features for m in ms))
    sym = all(bool((b["zero"] == 2 ** (a.bits - 1)).all()) for b in bufs)
    if be.unsupported(lay, sym) is not None:
        return None
    return QuantLinear.from_packed({k: torch.cat([b[k] for b in bufs]) for k in bufs[0]}, lay, be, persistent=False)


def _concat_unpacked(ms: list[QuantLinear]) -> QuantLinear | None:
    """The members' codes unpacked, concatenated and packed again for the fused shape's backend."""
    qws = [m.quantized_weight() for m in ms]  # unpacked once: symmetry check and concatenation
    backend = _fused_backend(ms, qws)
    if backend is None:
        return None
    fused = QuantizedWeight(torch.cat([q.codes for q in qws]), torch.cat([q.scale for q in qws]), torch.cat([q.zero for q in qws]),
                            qws[0].bits, qws[0].group_size)
    return QuantLinear(fused, None, backend, persistent=False)


def _fused_backend(ms: list[QuantLinear], qws: list[QuantizedWeight]) -> str | None:
    """Backend for the concatenated weights, or None when the members cannot be fused.

    Members on one backend keep it; members on different backends that ``auto`` chose (e.g. a
    narrow k_proj the int4 kernel cannot run alone) get ``auto``'s pick for the fused shape."""
    a = ms[0]
    if not _same_layout(ms):
        return None
    syms = [is_symmetric(q) for q in qws]
    lay = B.Layout(a.bits, a.group_size, a.in_features, sum(m.out_features for m in ms))
    if all(m.backend is a.backend for m in ms):
        be = a.backend
    elif all(m.backend is B.auto(m.layout, s) for m, s in zip(ms, syms)):
        be = B.auto(lay, all(syms))
    else:
        return None
    return be.name if be.unsupported(lay, all(syms)) is None else None


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse sibling packed linears that share their input; return how many groups were made.

    Only models that take ``input_ids`` or ``pixel_values`` are probed; others are left unfused
    (still correct), as is a model whose layers are not all in memory.
    """
    from .meta import has_meta

    cands = {n: m for n, m in model.named_modules() if type(m) is QuantLinear and not n.endswith(".fused")}
    if len(cands) < 2 or not hasattr(model, "get_input_embeddings") or has_meta(model):
        return 0  # an onloaded model (layers on disk) cannot run the probe; its checkpoint is fused when loaded
    made = 0
    for names in _shared_input_groups(model, cands):
        # the members leave ``cands`` here and live only in the helper's frame: their own packed
        # buffers are freed as soon as their group replaces them, not after the last group
        made += _fuse_group(model, names, [cands.pop(n) for n in names])
        trim_heap()  # the unpacked codes were transients between kept buffers
    return made


def _fuse_group(model: nn.Module, names: list[str], members: list[QuantLinear]) -> bool:
    """Replace ``members`` (siblings under one parent) by one :class:`FusedGroup`; False when they cannot be fused."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return False
    fused = _concat_packed(members) or _concat_unpacked(members)
    if fused is None:
        return False
    parent = model.get_submodule(parents.pop())
    children = [n.rpartition(".")[2] for n in names]
    group = FusedGroup(members, fused)
    parent.add_module("fused_" + "_".join(children), group)
    for i, (child, m) in enumerate(zip(children, members)):
        setattr(parent, child, FusedSlice(group, i, m))
    return True
