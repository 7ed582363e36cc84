"""ONNX Runtime as a measurement runtime: a graph written by :func:`leanfm.models.onnx_export.export_onnx`.

The session runs on the CPU provider with ``intra_op_num_threads=threads`` (``inter_op`` 1, all
graph optimizations). The KV cache stays inside ONNX Runtime between calls: each call's
``present.*`` outputs are fed back as the next ``past_key_values.*`` as ``OrtValue`` objects,
never converted to numpy; only the last position's logits come back to Python for the argmax.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LeanfmError
from ..sysinfo import cpu_flags
from .base import RuntimeSession

INSTALL_HINT = "ONNX Runtime is not installed; install it with: pip install 'leanfm[onnx]'"


def ort_module():
    """The onnxruntime module, or a one-line error naming the install command."""
    try:
        import onnxruntime
    except ImportError:
        raise LeanfmError(INSTALL_HINT) from None
    return onnxruntime


def cpu_session(model: bytes | str | Path, threads: int):
    """An ONNX Runtime session of ``model`` (a file, or the bytes of a ModelProto) on the CPU
    provider: ``threads`` intra-op threads, one inter-op, sequential, all graph optimizations;
    a graph ONNX Runtime cannot load is a one-line error."""
    ort = ort_module()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    what = "the graph" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's own exception types (invalid graph, unreadable file)
        raise LeanfmError(f"ONNX Runtime cannot load {what}: {' '.join(str(e).split())[:240]}") from None


def _cpu_isa() -> list[str]:
    """The SIMD extensions ONNX Runtime's MLAS kernels dispatch on, from /proc/cpuinfo (Linux)."""
    return sorted(cpu_flags() & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"})


class OnnxRuntimeSession(RuntimeSession):
    """One leanfm ONNX export loaded in ONNX Runtime (CPU); batch 1, greedy.

    path: the ``.onnx`` file; threads: ONNX Runtime's intra-op threads; n_ctx: the most tokens
    one context may hold (prompt plus generated), checked before each call.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int, n_ctx: int):
        super().__init__(path, threads, n_ctx)
        ort = ort_module()
        if not self.path.is_file():
            raise LeanfmError(f"no ONNX model at {self.path}; write one with leanfm.models.onnx_export.export_onnx")
        self._sess = cpu_session(self.path, threads)
        self._ort = ort
        inputs = self._sess.get_inputs()
        self._past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        names = {i.name for i in inputs}
        if "input_ids" not in names or not self._past_names:
            raise LeanfmError(f"{self.path} is not a leanfm ONNX export (inputs: {', '.join(sorted(names))[:160]}); "
                              "write one with leanfm.models.onnx_export.export_onnx")
        shape = next(i.shape for i in inputs if i.name == self._past_names[0])  # [batch, n_kv, past_seq, head_dim]
        self._kv_shape = (1, int(shape[1]), 0, int(shape[3]))
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        self._outputs = ["logits", *self._present_names]
        meta = self._sess.get_modelmeta().custom_metadata_map
        self.max_positions = int(meta.get("leanfm.max_positions", 0)) or None
        self._matmulnbits = int(meta["leanfm.matmulnbits_nodes"]) if "leanfm.matmulnbits_nodes" in meta else None
        if self.max_positions and n_ctx > self.max_positions:
            raise LeanfmError(f"n_ctx {n_ctx} exceeds the {self.max_positions} positions {self.path.name} was written for; "
                              f"use n_ctx <= {self.max_positions}")
        self._empty = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(self._kv_shape, np.float32))
        self._past: list | None = None
        self._len = 0

    def _run(self, ids: Sequence[int], past: list | None):
        """Run ``ids`` after ``past`` (None = fresh context): (logits OrtValue, presents)."""
        n = len(ids)
        if n == 0:
            raise LeanfmError("the ONNX Runtime session got no tokens to run")
        start = self._len if past is not None else 0
        if start + n > self.n_ctx:
            raise LeanfmError(f"the context would hold {start + n} tokens, more than n_ctx {self.n_ctx}")
        feeds = {"input_ids": self._ort.OrtValue.ortvalue_from_numpy(np.asarray(ids, dtype=np.int64).reshape(1, n))}
        for i, name in enumerate(self._past_names):
            feeds[name] = past[i] if past is not None else self._empty
        try:
            outs = self._sess.run_with_ort_values(self._outputs, feeds)
        except Exception as e:  # e.g. a token id outside the vocabulary
            raise LeanfmError(f"ONNX Runtime failed on {self.path.name}: {' '.join(str(e).split())[:240]}") from None
        self._len = start + n
        return outs[0], outs[1:]

    def window_logits(self, ids: Sequence[int]) -> np.ndarray:
        logits, _ = self._run(ids, None)
        self._past, self._len = None, 0  # a window is its own context; a later step() needs a prefill first
        return logits.numpy()[0].astype(np.float32, copy=False)

    def prefill(self, ids: Sequence[int]) -> int:
        logits, self._past = self._run(ids, None)
        return int(np.argmax(logits.numpy()[0, -1]))

    def step(self, token: int) -> int:
        if self._past is None:
            raise LeanfmError("step() needs a context: call prefill() first")
        logits, self._past = self._run([token], self._past)
        return int(np.argmax(logits.numpy()[0, -1]))

    def version(self) -> str:
        return self._ort.__version__

    def build(self) -> dict:
        """Providers, ONNX Runtime's device build, the CPU's SIMD flags and how many packed
        ``MatMulNBits`` nodes (leanfm's integer codes) the graph holds."""
        return {"providers": self._sess.get_providers(), "device": self._ort.get_device(), "cpu_isa": _cpu_isa(),
                "matmulnbits_nodes": self._matmulnbits}

    def close(self) -> None:
        self._past = None
        self._sess = None

