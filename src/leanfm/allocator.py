"""The C heap's hold on freed memory during training (glibc only).

glibc serves an allocation above its mmap threshold with its own mapping, returned to the OS on
free, and everything smaller from the heap, whose freed chunks stay resident. The threshold is
dynamic: each freed mapped chunk raises it to that chunk's size (up to 32 MiB). A training step
allocates and frees many megabyte-sized transients between the activations it keeps, so after
the first few the threshold sits above them, they land in the heap between saved activations,
and their pages stay resident when freed. Measured on SmolLM2-135M with LoRA (4 x 256 tokens):
the forward pass grew the resident set by about twice the bytes autograd saves; with a fixed
threshold, by the saved bytes alone (docs/benchmarks.md, issue 17).

:func:`fix_mmap_threshold` pins the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns
the dynamic adjustment off) so every tensor above it is its own mapping and goes back to the OS
when freed. It lasts for the rest of the process and costs page faults on each new mapping.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial threshold

_set: int | None = None


def _libc() -> ctypes.CDLL:
    """The C library (raises OSError where it cannot be loaded)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def fix_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> int | None:
    """Pin glibc's mmap threshold at ``nbytes``; returns the threshold in force, or None where
    the C library is not glibc (nothing changed)."""
    global _set
    if _set == nbytes:
        return _set
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:
        return None
    _set = int(nbytes)
    return _set


def mmap_threshold() -> int | None:
    """The threshold :func:`fix_mmap_threshold` pinned in this process, or None (glibc's dynamic default)."""
    return _set


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``, which also releases
    whole free pages inside the heap, not just at its top). A loader that unpacks each layer into
    transients between the long-lived tensors it keeps calls this per layer, so the holes those
    transients leave do not stay resident. Returns False where the C library is not glibc."""
    global _trim
    if _trim is None:
        try:
            _trim = _libc().malloc_trim
            _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    if not _trim:
        return False
    _trim(0)
    return True


_trim = None
