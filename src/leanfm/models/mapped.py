"""Tensors that still live in a memory-mapped checkpoint file.

transformers loads safetensors by mapping the file: parameters are views of its pages. When a
recipe replaces most weights (packed int4, factorized, pruned copies), the few tensors it keeps
(embeddings, norms) hold the whole mapping alive, and every page read while compressing stays
counted in the process's resident set: a model quantized to 210 MiB measured a higher peak RSS
than its 513 MiB fp32 original. Copying the kept tensors into ordinary memory lets the mapping
go, so ``peak_rss_bytes`` reflects the compressed model. Linux only (reads ``/proc/self/maps``);
elsewhere nothing is copied.
"""
from __future__ import annotations

import ctypes
import functools
import mmap

from torch import nn

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def _file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().endswith(suffix):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((lo, hi))
    except OSError:
        return []
    return spans


def _release(ptr: int, nbytes: int) -> None:
    """Drop the resident pages lying wholly inside ``[ptr, ptr + nbytes)`` of a private file
    mapping. Pages shared with a neighbouring tensor are kept (it may not be copied yet, or may
    hold changes); a dropped page that is read again comes back from the file."""
    page = mmap.PAGESIZE
    lo, hi = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if hi > lo and _libc() is not None:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's handle with ``madvise`` (once per process), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") else None
    except OSError:
        return None


def copy_out_of_mapped_files(model: nn.Module) -> int:
    """Give every parameter and buffer that points into a mapped checkpoint file its own memory
    (tied tensors stay tied); return the bytes copied.

    Each tensor's mapped pages are released as soon as it is copied, so the resident set grows by
    at most one tensor, not by the whole model. This matters when the weights were changed in
    place (training): their pages are then private copies that stay resident as long as the
    mapping lives."""
    spans = _file_mappings()
    if not spans:
        return 0
    copied, done = 0, {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "cpu":  # meta (an onloaded layer on disk): no storage
                    continue
                ptr = t.untyped_storage().data_ptr()
                if ptr in done:
                    t.data = done[ptr]
                    continue
                if any(lo <= ptr < hi for lo, hi in spans):
                    old = t.data
                    done[ptr] = old.clone()
                    copied += t.nbytes
                    t.data = done[ptr]
                    if old.is_contiguous():
                        _release(old.data_ptr(), old.nbytes)
                    del old
    return copied
