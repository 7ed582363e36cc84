"""leanfm.allocator: glibc's mmap threshold pinned for training, the heap trimmed for loaders, and a clean no-op elsewhere."""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from leanfm import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("pin,trim", [(False, False), (True, False), (False, True)])
def test_a_freed_transient_leaves_the_resident_set_only_when_pinned_or_trimmed(pin, trim):
    # In a fresh process: a 16 MiB block freed once raises glibc's dynamic threshold to 16 MiB,
    # so an 8 MiB transient between two kept blocks comes from the heap and stays resident when
    # freed. With the threshold pinned it is its own mapping and leaves at once.
    code = f"""
import torch
from leanfm.allocator import fix_mmap_threshold, mmap_threshold, trim_heap
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
if {pin}:
    assert fix_mmap_threshold() == 128 * 1024 and mmap_threshold() == 128 * 1024
x = torch.ones(4 << 20)  # a 16 MiB block, freed
del x
keep = [torch.ones(1 << 18)]
t = torch.ones(2 << 20)  # 8 MiB
keep.append(torch.ones(1 << 18))
before = rss(); del t
if {trim}:
    assert trim_heap()
print((before - rss()) / (8 << 20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    released = float(out.split()[-1])
    assert released > 0.9 if pin or trim else released < 0.1


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_set", None)

    def no_libc(*a, **k):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.fix_mmap_threshold() is None and allocator.mmap_threshold() is None
    monkeypatch.setattr(allocator, "_trim", None)
    assert allocator.trim_heap() is False
