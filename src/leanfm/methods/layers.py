"""Generic access to a decoder's layer stack and layer-by-layer calibration.

``decoder_layers(model)`` finds the ``nn.ModuleList`` of decoder layers (the longest one whose
length matches ``config.num_hidden_layers``), without per-family code.

``LayerwiseRunner`` implements the sequential calibration loop used by GPTQ (Frantar et al.,
2023, §4 / reference ``llama_sequential``), AWQ and SmoothQuant: the calibration batch runs
through the embeddings once; then, layer by layer, the algorithm observes the layer's inputs
(through hooks), changes the layer, and the layer's outputs *after* the change become the next
layer's inputs. Only one layer's inputs and outputs are held at a time.

The calibration batch is token ids ``[n, seqlen]`` for a language model, or images
``[n, 3, H, W]`` (``pixel_values``) for a vision transformer, whose encoder blocks are the stack.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import progress
from ..errors import LeanfmError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise LeanfmError("could not find the decoder layer stack (an nn.ModuleList of num_hidden_layers layers)")
    return best


class _Stop(Exception):
    pass


def _first_out(out):
    return out[0] if isinstance(out, tuple) else out


class LayerwiseRunner:
    """Feeds calibration ids ``[n, seqlen]`` (or images ``[n, 3, H, W]``) through the layer stack
    one layer at a time."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        if ids.dim() not in (2, 4) or ids.shape[0] < 1:
            raise LeanfmError("calibration must be token ids [n_samples, seqlen] or images [n_samples, 3, H, W] with at "
                              "least one sample")
        self.model, self.ids = model, ids
        self.images = ids.dim() == 4
        self.layer_kw = {} if self.images else {"use_cache": False}
        self.layers = decoder_layers(model)
        self.stream = getattr(model, "leanfm_stream", None)
        self.kwargs = self._layer_kwargs()
        self.hidden = self._layer0_inputs()

    @torch.no_grad()
    def _layer_kwargs(self) -> list[dict]:
        """Per-layer keyword arguments (masks, rotary tables) for one sample of this length.

        The model's own forward computes them before its layer loop (Gemma picks per layer type),
        so it runs once with every layer passing its input through unchanged and stops at the
        last layer: nothing of the layers' weights is needed (an onloaded model has none yet)."""
        recorded: list[dict] = [None] * len(self.layers)
        last = len(self.layers) - 1

        def rec(i):
            def hook(mod, args, kwargs):
                recorded[i] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
                if i == last:
                    raise _Stop

            return hook

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        own = [layer.__dict__.get("forward") for layer in self.layers]
        hs = [layer.register_forward_pre_hook(rec(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        for layer in self.layers:
            layer.forward = passthrough
        try:
            self._forward(self.ids[:1])
        except _Stop:
            pass
        finally:
            for h in hs:
                h.remove()
            for layer, f in zip(self.layers, own):
                del layer.forward
                if f is not None:
                    layer.forward = f
        return recorded

    @torch.no_grad()
    def _layer0_inputs(self) -> torch.Tensor:
        store = []

        def grab(mod, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        hidden = None
        try:
            for i in range(self.ids.shape[0]):
                try:
                    self._forward(self.ids[i : i + 1])
                except _Stop:
                    pass
                x = store.pop()
                if hidden is None:
                    hidden = self._new((self.ids.shape[0], *x.shape[1:]), x.dtype)
                hidden[i : i + 1] = x
        finally:
            h.remove()
        return hidden

    def _forward(self, sample: torch.Tensor):
        return self.model(pixel_values=sample) if self.images else self.model(input_ids=sample, use_cache=False)

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype):
        """Room for one layer's inputs or outputs of every sample: in memory, or in a file when an
        onloaded run's budget leaves no room for two such sets (:mod:`.activations`)."""
        nbytes = 2 * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        folder = self.stream.spill_folder(nbytes) if self.stream is not None else None
        if folder is None:
            return torch.empty(shape, dtype=dtype)
        from .activations import DiskActivations

        return DiskActivations(shape, folder, dtype)

    @torch.no_grad()
    def run_layer(self, i: int) -> torch.Tensor:
        """Outputs of layer ``i`` for every calibration sample, from the current inputs."""
        layer = self.layers[i]
        outs = self._new(tuple(self.hidden.shape), self.hidden.dtype)
        for s in range(self.hidden.shape[0]):
            outs[s : s + 1] = _first_out(layer(self.hidden[s : s + 1], **self.layer_kw, **self.kwargs[i]))
        return outs

    def run_layer_with_hooks(self, i: int, hooks: dict[nn.Module, Callable]) -> None:
        """Run layer ``i`` on all samples with forward hooks ``{module: hook}`` attached."""
        hs = [m.register_forward_hook(h) for m, h in hooks.items()]
        try:
            self.run_layer(i)
        finally:
            for h in hs:
                h.remove()

    def collect_inputs(self, i: int, mods: dict[str, nn.Module], make_stat: Callable[[nn.Module], object],
                       share_equal_inputs: bool = False) -> dict:
        """Run layer ``i`` on all samples, feeding each module's 2-D input to ``stat.add``;
        returns ``{name: stat}`` (a Hessian, input norms, activation statistics...).

        ``share_equal_inputs``: modules whose input on the first sample equals an earlier
        module's (q/k/v, gate/up) share that module's stat object, fed once per sample (GPTQ: one
        Hessian for q, k and v; a 7B layer's seven 4096/11008-wide Hessians become four)."""
        stats: dict = {}
        leader: dict[str, str] = {}  # module -> the module whose stat it uses
        first: dict[str, torch.Tensor] = {}  # first-sample inputs of the leaders, while grouping

        def add(n: str, x: torch.Tensor) -> None:
            if n not in leader:
                same = [m for m, y in first.items() if equal_inputs(y, x)] if share_equal_inputs else []
                leader[n] = same[0] if same else n
                if not same:
                    stats[n] = make_stat(mods[n])
                    if share_equal_inputs:
                        first[n] = x.clone()
            elif first:
                first.clear()  # a second sample: the groups are known
            if leader[n] == n:
                stats[n].add(x)

        handles = capture_inputs(mods, add)
        try:
            self.run_layer(i)
        finally:
            for h in handles:
                h.remove()
            first.clear()
        for n in mods:  # a module the forward never called: an empty stat, as without sharing
            if n not in leader:
                leader[n], stats[n] = n, make_stat(mods[n])
        return {n: stats[leader[n]] for n in mods}

    def input_observer(self, i: int, lin: nn.Module) -> Callable[[], torch.Tensor]:
        """A function that runs layer ``i`` on the first sample and returns ``lin``'s input ``[T, in]``."""

        def observe() -> torch.Tensor:
            grab = {}
            h = lin.register_forward_hook(lambda m, a, o: grab.update(x=a[0].detach()))  # returns None: output untouched
            try:
                with torch.no_grad():
                    self.layers[i](self.hidden[:1], **self.layer_kw, **self.kwargs[i])
            finally:
                h.remove()
            return grab["x"].reshape(-1, grab["x"].shape[-1])

        return observe

    def run(self, process: Callable[[int, nn.Module], None], desc: str,
            done: Callable[[int, nn.Module], None] | None = None) -> None:
        """For each layer: ``process(i, layer)`` (it may run :meth:`run_layer` with hooks), then
        recompute that layer's outputs with its new weights, ``done(i, layer)`` (e.g. pack the
        layer's quantized weights), and advance. On an onloaded model (``model.leanfm_stream``,
        :mod:`leanfm.models.onload`) each layer is read from disk first and, once done, written
        to the output and released, so one layer's weights are in memory at a time."""
        with progress.bar(desc, len(self.layers)) as adv:
            for i, layer in enumerate(self.layers):
                if self.stream is not None:
                    self.stream.load_layer(i)
                process(i, layer)
                old, self.hidden = self.hidden, self.run_layer(i)
                if hasattr(old, "close"):  # a file of activations (spilled): deleted now, not at garbage collection
                    old.close()
                if done is not None:
                    done(i, layer)
                if self.stream is not None:
                    self.stream.store_layer(i, layer)
                adv()


def targets_in(layer: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The subset of ``targets`` (name -> module) that lives inside ``layer``."""
    inside = {id(m) for m in layer.modules()}
    return {n: m for n, m in targets.items() if id(m) in inside}


def equal_inputs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two recorded inputs are the same input (q/k/v, gate/up read one tensor): same shape and values."""
    return a.shape == b.shape and torch.equal(a, b)


def group_by_input(seen: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names whose recorded inputs are identical (e.g. q/k/v, gate/up), in first-seen order."""
    groups: list[list[str]] = []
    for n, x in seen.items():
        for g in groups:
            if equal_inputs(seen[g[0]], x):
                g.append(n)
                break
        else:
            groups.append([n])
    return groups


def capture_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Register forward hooks calling ``fn(name, input_2d)`` for each module; returns the handles."""

    def make(name):
        def hook(mod, args, out):
            x = args[0]
            fn(name, x.detach().reshape(-1, x.shape[-1]))

        return hook

    return [m.register_forward_hook(make(n)) for n, m in modules.items()]
