"""Models larger than memory: the checkpoint stays on disk, one decoder layer is in RAM at a time.

:class:`Onloaded` builds the model's module tree from its config with every parameter on the
``meta`` device (shapes, no storage; buffers such as rotary tables stay real, they are small),
and reads tensors from the checkpoint's files on demand (:class:`leanfm.formats.tensorfiles.TensorIndex`, plain
reads, never a whole-file load). ``load(prefix)`` fills the parameters of one module in place,
upcast to fp32 for the math (a bf16 source is never converted as a whole); ``release(module)``
returns its storage. Modules are filled *in place*, so a method that listed its target linears
before the loop (GPTQ's ``targets``) still holds the right objects when their layer arrives.

A :class:`Stream` is what a layer-by-layer method sees while compressing an onloaded model
(``model.leanfm_stream``): :class:`leanfm.methods.layers.LayerwiseRunner` asks it to load each
decoder layer before processing it and, once the layer is final, to write it to the output
(:class:`leanfm.formats.tensorfiles.ShardWriter`, one file per layer) and release it. Everything outside the layer
stack (embeddings, final norm) is loaded at the start and written at the end; an untied head that
no step changes is read only at the end, when no layer is in memory (for a 7B-shaped model with a
49k vocabulary that is 0.8 GB less at the peak).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError
from ..formats.tensorfiles import ShardWriter, TensorIndex
from ..kernels.meta import skeleton, tied_aliases


class Onloaded:
    """A checkpoint folder's model as a meta skeleton plus on-demand reads of its tensors."""

    def __init__(self, path: str | Path, compute_dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig

        self.path = Path(path)
        self.index = TensorIndex(self.path)  # headers of every file, checked, before the model is built
        self.config = AutoConfig.from_pretrained(str(self.path))
        self.model = skeleton(self.config)
        self.compute_dtype = compute_dtype
        self.tied = tied_aliases(self.model)
        self.source_dtypes = sorted({str(self.index.dtype(n)).replace("torch.", "") for n in self.index.names()})

    def _stored_name(self, name: str) -> str:
        if name in self.index:
            return name
        alias = self.tied.get(name)
        if alias and alias in self.index:
            return alias
        raise LeanfmError(f"checkpoint {self.path} has no tensor {name} (config.json describes it); the checkpoint is incomplete: "
                          "re-download the model, or re-run leanfm compress")

    def load(self, prefix: str, source_prefix: str | None = None) -> nn.Module:
        """Fill the parameters of the module at ``prefix`` (``""``: the whole model) in place,
        from the tensors stored under ``source_prefix`` (default: the same; differs once layers
        were dropped and the rest renumbered)."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        src = prefix if source_prefix is None else source_prefix
        base = f"{src}." if src else ""
        for mname, mod in module.named_modules():
            for pname in list(mod._parameters):
                self._fill(mod, pname, f"{base}{mname + '.' if mname else ''}{pname}")
        self._retie()
        return module

    def _fill(self, mod: nn.Module, pname: str, stored: str) -> None:
        """Give ``mod``'s meta parameter ``pname`` the tensor stored as ``stored`` (fp32 for floats)."""
        p = mod._parameters[pname]
        if p is None or not p.is_meta:
            return
        name = self._stored_name(stored)
        t = self.index.read(name, self.compute_dtype if p.is_floating_point() else None)
        if tuple(t.shape) != tuple(p.shape):
            raise LeanfmError(f"{self.index.entries[name].file}: tensor {stored} has shape {list(t.shape)}, "
                              f"config.json needs {list(p.shape)}; the checkpoint does not match its config")
        mod._parameters[pname] = nn.Parameter(t, requires_grad=False)

    def _retie(self) -> None:
        """A tied head shares the embedding's parameter object once that is loaded."""
        for name, stored in self.tied.items():
            owner, _, leaf = name.rpartition(".")
            src_owner, _, src_leaf = stored.rpartition(".")
            src = self.model.get_submodule(src_owner)._parameters[src_leaf]
            self.model.get_submodule(owner)._parameters[leaf] = src

    def untied_head(self) -> str | None:
        """The module name of the output head when it has weights of its own (not tied to the
        embedding), else None."""
        head = self.model.get_output_embeddings()
        if head is None:
            return None
        name = next((n for n, m in self.model.named_modules() if m is head), None)
        return None if name is None or f"{name}.weight" in self.tied else name

    def load_outside(self, prefix: str, defer: tuple[str, ...] = ()) -> None:
        """Fill every parameter outside the module at ``prefix`` (the decoder stack): embeddings,
        final norm, head; modules named in ``defer`` stay meta (``load`` them when needed)."""
        for owner_name, mod in self.model.named_modules():
            if owner_name == prefix or owner_name.startswith(prefix + "."):
                continue
            if any(owner_name == d or owner_name.startswith(d + ".") for d in defer):
                continue
            for pname in list(mod._parameters):
                full = f"{owner_name}.{pname}" if owner_name else pname
                if full not in self.tied:  # a tied head is filled by _retie
                    self._fill(mod, pname, full)
        self._retie()

    @staticmethod
    def release(module: nn.Module) -> None:
        """Give back the storage of ``module``'s parameters and buffers (they become meta again)."""
        module.to("meta")


class Stream:
    """The onloaded compression of one model: which layers are loaded, and where they go."""

    def __init__(self, source: Onloaded, out: str | Path, layers_prefix: str, activation_budget: int | None = None,
                 scratch: str | Path | None = None):
        self.source = source
        self.activation_budget = activation_budget  # bytes calibration activations may hold in memory (None: no limit)
        self.scratch = scratch  # where spilled activations go (default: the system's temporary folder)
        self.writer = ShardWriter(out)
        self.layers_prefix = layers_prefix  # e.g. "model.layers"
        self.manifest: dict[str, dict] = {}
        self.stored: set[int] = set()
        self.order = list(range(len(source.model.get_submodule(layers_prefix))))  # model layer -> source layer

    def spill_folder(self, nbytes: int) -> str | Path | None:
        """Where to keep ``nbytes`` of calibration activations on disk, or None to keep them in memory."""
        if self.activation_budget is None or nbytes <= self.activation_budget:
            return None
        return self.scratch or tempfile.gettempdir()

    def load_layer(self, i: int) -> nn.Module:
        return self.source.load(f"{self.layers_prefix}.{i}", f"{self.layers_prefix}.{self.order[i]}")

    def release_layer(self, i: int) -> None:
        """Give a layer's memory back without writing it (a read-only pass, e.g. scoring)."""
        Onloaded.release(self.source.model.get_submodule(f"{self.layers_prefix}.{i}"))

    def renumber(self, keep: list[int]) -> None:
        """Layers were removed: layer ``j`` of the model is now layer ``keep[j]`` of the source."""
        if self.stored:
            raise LeanfmError("internal: layers removed after some were written")
        self.order = [self.order[k] for k in keep]

    def store_layer(self, i: int, layer: nn.Module) -> None:
        from ..kernels.checkpoint import module_tensors

        prefix = f"{self.layers_prefix}.{i}"
        tensors, entries = module_tensors(layer, prefix)
        self.writer.write(f"layer-{i:05d}", tensors)
        self.manifest.update(entries)
        self.stored.add(i)
        Onloaded.release(layer)
