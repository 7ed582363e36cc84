"""Inference runtimes leanfm measures a compressed model in, besides its own torch path.

``torch`` is leanfm's eager PyTorch loop (no file); the others load a file leanfm exports:
``llama.cpp`` a GGUF (:mod:`.llamacpp`), ``onnxruntime`` an ONNX decoder with KV cache
(:mod:`.onnxrt`). ``vllm`` needs a CUDA GPU and vLLM. Each is an optional install; a missing
one is refused in one line naming the install command.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LeanfmError

RUNTIMES = ("torch", "llama.cpp", "onnxruntime", "vllm")
_INSTALL = {
    "llama.cpp": ("llama_cpp", "pip install 'leanfm[llamacpp]'  (compiles llama.cpp from source: about 8-15 minutes on 2 cores)"),
    "onnxruntime": ("onnxruntime", "pip install 'leanfm[onnx]'"),
    "vllm": ("vllm", "pip install 'leanfm[vllm]'  (needs a CUDA GPU)"),
}
EXTENSION = {"llama.cpp": ".gguf", "onnxruntime": ".onnx"}
GGUF_TYPES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1")  # --type: auto = the block type of the recipe's grid


def check_runtime(name: str) -> None:
    """Refuse, in one line, a runtime leanfm does not know, one not installed, or one this machine cannot run."""
    if name not in RUNTIMES:
        raise LeanfmError(f"unknown runtime '{name}'; use one of: {', '.join(RUNTIMES)}")
    if name == "torch":
        return
    module, install = _INSTALL[name]
    if name == "vllm":
        import torch

        if not torch.cuda.is_available():
            raise LeanfmError("--runtime vllm needs a CUDA GPU, and this machine has none; use --runtime torch, llama.cpp or onnxruntime")
    if importlib.util.find_spec(module) is None:
        raise LeanfmError(f"{name} is not installed; install it with: {install}")


def export_for(name: str, model, tokenizer, dest: Path, gguf_type: str = "auto") -> Path:
    """Write ``model`` as the file runtime ``name`` loads, at ``dest`` (its extension added);
    a float model goes to llama.cpp as f32 (the same weights as leanfm's fp32 baseline)."""
    from ..kernels.checkpoint import quantized_layers

    path = dest.with_suffix(EXTENSION[name]) if name in EXTENSION else dest
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "llama.cpp":
        from ..models.checkpoint import gguf_type_for, source_gguf
        from ..models.gguf_export import export_gguf

        qlayers = quantized_layers(model)
        qtype = gguf_type if gguf_type != "auto" else (gguf_type_for(qlayers) if qlayers else "f32")
        import shutil

        try:
            return export_gguf(model, tokenizer, path, qtype, source_gguf=source_gguf(model, path.parent))
        finally:
            shutil.rmtree(path.parent / ".source", ignore_errors=True)
    if name == "onnxruntime":
        from ..models.onnx_export import export_onnx

        return export_onnx(model, path)
    raise LeanfmError(f"leanfm has no file export for the runtime {name}")


def open_session(name: str, path: Path, threads: int, n_ctx: int):
    """A :class:`.base.RuntimeSession` of ``path`` in runtime ``name``."""
    check_runtime(name)
    if name == "llama.cpp":
        from .llamacpp import LlamaCppSession

        return LlamaCppSession(path, threads, n_ctx)
    if name == "onnxruntime":
        from .onnxrt import OnnxRuntimeSession

        return OnnxRuntimeSession(path, threads, n_ctx)
    raise LeanfmError(f"--runtime {name} has no measurement session in leanfm yet")


def _grids(step) -> list[tuple[int, int | None, bool]]:
    """Every (bits, group_size, symmetric) grid a quantizing step may write (a mixed-precision
    step declares several through ``grids()``)."""
    if hasattr(step, "grids"):
        return list(step.grids())
    return [(step.bits, step.group_size, bool(step.symmetric))]


def _llama_cpp_grid_problem(step, gguf_type: str) -> str | None:
    """Why a quantizing step's grids cannot go into a GGUF of ``gguf_type`` unchanged (None if they can)."""
    for bits, gs, sym in _grids(step):
        why = _llama_cpp_one_grid(bits, gs, sym, gguf_type)
        if why:
            return why
    return None


def _llama_cpp_one_grid(bits: int, gs: int | None, sym: bool, gguf_type: str) -> str | None:
    from ..formats.gguf_blocks import TYPES, fitting_types, grid_problem

    if gguf_type in TYPES:
        return grid_problem(bits, gs, sym, gguf_type)
    if gguf_type in ("f32", "f16"):
        return f"packed {bits}-bit weights cannot be written as {gguf_type}"
    if fitting_types(bits, gs, sym):
        return None
    return grid_problem(bits, gs, sym, "q4_1" if not sym else "q4_0" if bits <= 4 else "q8_0")


def check_recipes(name: str, recipes, gguf_type: str = "auto") -> None:
    """Refuse, before any work, a recipe whose effect the runtime's file cannot hold or run: a
    KV-cache or decoding policy (the runtime decodes its own way), factorized or CSR layers,
    activation quantization, a weight grid the file format does not store unchanged."""
    if name == "torch":
        return
    from ..formats.gguf_blocks import fitting_step

    for r in recipes:
        for st in r.steps:
            produces, backend = getattr(st, "produces", ""), getattr(st, "backend", "")
            why = None
            if produces in ("kv-policy", "decoding-policy"):
                why = f"its {st.method} policy runs in leanfm's decode loop, not in {name}'s"
            elif produces == "int-embeddings":
                why = f"leanfm writes no {name} file for a packed embedding table ({st.method}) yet"
            elif produces == "low-rank":
                why = f"{name} files hold one matrix per linear, not {st.method}'s two factors"
            elif produces == "sparse-weights" and backend == "csr":
                why = f"{name} files hold dense weights; use backend: masked to export the pruned weights dense"
            elif produces == "int-weights" and backend != "fake":
                if getattr(st, "act_bits", None):
                    why = f"{st.method} quantizes activations, which a {name} file cannot express"
                elif name == "llama.cpp":
                    why = _llama_cpp_grid_problem(st, gguf_type)
                elif name == "onnxruntime" and any(g[0] not in (4, 8) for g in _grids(st)):
                    why = f"MatMulNBits holds 4- or 8-bit codes, not {next(g[0] for g in _grids(st) if g[0] not in (4, 8))}-bit"
            if why:
                raise LeanfmError(f"recipe {r.name} cannot be measured in --runtime {name}: {why}; "
                                  + (f"for llama.cpp use a step such as {fitting_step()}" if name == "llama.cpp" and produces == "int-weights"
                                     else "drop that step or use --runtime torch"))
