"""Calibration activations on disk, for layer-by-layer calibration under a memory budget.

:class:`~.layers.LayerwiseRunner` holds one layer's inputs and outputs for every calibration
sample, ``2 x samples x seqlen x hidden x 4`` bytes: 1 GiB for 128 x 2048 tokens of a 1B model,
8.6 GiB for a 7B one. When that exceeds what ``--max-memory`` leaves, the runner keeps them in a
file instead and reads one sample at a time (it only ever feeds a layer one sample). Plain file
reads and writes, not a mapping: a mapping's resident pages would count against the process.
The file lives in a temporary folder and is deleted when the run ends.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..formats.tensorfiles import read_exact


class DiskActivations:
    """``[n, seqlen, hidden]`` fp32 samples in a file; ``x[s:s+1]`` reads one, ``x[s:s+1] = t`` writes one."""

    def __init__(self, shape: tuple[int, ...], folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._dir = tempfile.TemporaryDirectory(prefix="leanfm-acts-", dir=folder)
        self.path = Path(self._dir.name) / "acts.bin"
        self.sample_bytes = int(torch.Size(shape[1:]).numel()) * torch.tensor([], dtype=dtype).element_size()
        with open(self.path, "wb") as f:
            f.truncate(self.sample_bytes * self.shape[0])
        self._fd = os.open(self.path, os.O_RDWR)

    def empty_like(self) -> "DiskActivations":
        return DiskActivations(tuple(self.shape), Path(self._dir.name).parent, self.dtype)

    def _index(self, key) -> int:
        if isinstance(key, slice):
            start = key.start or 0
            stop = key.stop if key.stop is not None else start + 1
            if stop - start != 1 or (key.step or 1) != 1:
                raise IndexError("DiskActivations reads and writes one sample at a time (x[s:s+1])")
            return start
        raise IndexError("DiskActivations is indexed by a one-sample slice")

    def __getitem__(self, key) -> torch.Tensor:
        s = self._index(key)
        out = torch.empty((1, *self.shape[1:]), dtype=self.dtype)
        if read_exact(self._fd, memoryview(out.view(-1).view(torch.uint8).numpy()), s * self.sample_bytes) != self.sample_bytes:
            raise OSError(f"short read from {self.path}")
        return out

    def __setitem__(self, key, value: torch.Tensor) -> None:
        s = self._index(key)
        data = memoryview(value.detach().to(self.dtype).contiguous().view(-1).view(torch.uint8).numpy())
        done = 0
        while done < self.sample_bytes:
            done += os.pwritev(self._fd, [data[done:]], s * self.sample_bytes + done)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._dir.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
