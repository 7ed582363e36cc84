"""Memory metrics: bytes really held by the weights, checkpoint size, peak RSS, KV cache."""
from __future__ import annotations

import resource

import torch
from torch import nn

from ..kernels.modules import held_bytes


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored now (shared/tied storage counted once)."""
    return held_bytes(model)


def quantized_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the packed linears hold, bytes the same linears hold in fp32); (0, 0) if none."""
    from ..kernels.qlinear import QuantLinear

    packed = fp32 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            packed += sum(t.untyped_storage().nbytes() for t in list(m.buffers()) + list(m.parameters()))
            fp32 = fp32 + 4 * m.in_features * m.out_features + (4 * m.out_features if m.bias is not None else 0)
    return packed, fp32


def model_size_on_disk_bytes(model: nn.Module) -> int:
    """Size of the model's safetensors file, written for real to a temporary directory (packed
    models in the leanfm checkpoint format that ``leanfm compress`` writes)."""
    from ..models.checkpoint import tensors_file_bytes

    return tensors_file_bytes(model)


def tensor_bytes(obj, _seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (a transformers Cache, list, dict...)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


class PeakRSS:
    """Peak resident set size over a block: resets the kernel's high-water mark when allowed.

    Linux resets ``VmHWM`` on ``echo 5 > /proc/self/clear_refs``; elsewhere (or if denied) the
    process-lifetime peak from ``getrusage`` is used and ``scope`` says so.
    """

    def __enter__(self):
        _release_free_heap()
        self.scope = "process-lifetime"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.scope = "measured-block"
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.bytes = _vm_hwm() if self.scope == "measured-block" else None
        if self.bytes is None:
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.scope = "process-lifetime"
        return False


def _release_free_heap() -> None:
    """Return memory freed by earlier runs to the OS (glibc keeps it mapped), so the peak reflects this run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_bytes(path: str, key: str) -> int | None:
    """A ``kB`` field of a /proc file (``/proc/self/status`` VmHWM, VmRSS; ``/proc/meminfo``
    MemAvailable) in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _vm_hwm() -> int | None:
    return proc_bytes("/proc/self/status", "VmHWM")