"""Tensor by tensor access to a checkpoint folder's safetensors files, without loading them.

:class:`TensorIndex` reads only the headers (one file, or the shards a
``model.safetensors.index.json`` names) and then reads one tensor at a time with plain file
reads into its own memory. Not ``mmap``: pages of a mapped file that were read count in the
process's resident set for as long as the mapping lives, so streaming a 13.5 GB checkpoint
through a mapping shows a 13.5 GB peak RSS even though only one layer is in use; a read into a
private buffer leaves the file's pages in the page cache, which the kernel reclaims as needed.

:class:`ShardWriter` writes tensors a group at a time (one decoder layer per file) and the
index at the end, in the Hugging Face sharded layout ``from_pretrained`` reads.

Every damaged input is one :class:`LeanfmError` naming the file (and tensor): a truncated or
corrupt file, a shard the index names that is missing, a dtype leanfm cannot read.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LeanfmError

REWRITE_HINT = "re-run leanfm compress to rewrite it, or re-download the model"
INDEX = "model.safetensors.index.json"
# safetensors dtype names leanfm reads, and their torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}


def check_safetensors(file: str | Path) -> None:
    """Refuse a truncated or corrupt safetensors file, naming it, by reading only its header:
    8 bytes of header length, the JSON header, then the data its offsets must exactly cover."""
    file = Path(file)
    bad = f"{file} is truncated or corrupt"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LeanfmError(f"{bad} (it has only {size} bytes); {REWRITE_HINT}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise LeanfmError(f"{file} is truncated (its header alone needs {n + 8} bytes, the file has {size}); {REWRITE_HINT}")
            raw = f.read(n)
    except OSError as e:
        raise LeanfmError(f"cannot read {file}: {e.strerror or e}; check that the file is readable") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
        raise LeanfmError(f"{bad} (its header is not valid safetensors JSON); {REWRITE_HINT}") from None
    want = 8 + n + end
    if size < want:
        raise LeanfmError(f"{file} is truncated ({size} bytes, its header describes {want}); {REWRITE_HINT}")
    if size > want:
        raise LeanfmError(f"{bad} ({size} bytes, its header describes {want}); {REWRITE_HINT}")


def read_exact(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes of the file ``fd`` from ``offset`` into ``view``, looping (one read
    returns at most ~2 GiB on Linux); the bytes read, fewer only where the file ends."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(file: Path) -> tuple[int, dict]:
    check_safetensors(file)  # truncated / corrupt: one line naming the file
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n).decode("utf-8"))


class TensorIndex:
    """Name -> where the tensor lives, for every safetensors file of the folder ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = self._files()
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            base, header = _header(f)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta.get("dtype") not in DTYPES:
                    raise LeanfmError(f"{f}: tensor {name} has dtype {meta.get('dtype')}, which leanfm cannot read (it reads "
                                      f"{', '.join(DTYPES)}); convert the checkpoint to bf16, fp16 or fp32 first")
                lo, hi = (int(x) for x in meta["data_offsets"])
                self.entries[name] = TensorEntry(f, meta["dtype"], tuple(int(d) for d in meta["shape"]), base + lo, base + hi)

    def _files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(wmap.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LeanfmError(f"{index} is not a valid safetensors index (no weight_map of tensor -> file); {REWRITE_HINT}") from None
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise LeanfmError(f"checkpoint {self.path} is missing shard {missing[0]} (of {len(shards)} named in {INDEX}"
                                  f"{f', {len(missing)} missing' if len(missing) > 1 else ''}); copy the missing files, or re-download the model")
            return [self.path / s for s in shards]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise LeanfmError(f"no safetensors files in {self.path}; onloading reads safetensors checkpoints (re-save the model "
                              "with safe_serialization, or drop --max-memory to load it whole)")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]

    def nbytes(self, prefix: str = "") -> int:
        return sum(e.nbytes for n, e in self.entries.items() if n.startswith(prefix))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` in its own memory (converted to ``dtype`` when given)."""
        e = self.entries.get(name)
        if e is None:
            raise LeanfmError(f"checkpoint {self.path} has no tensor {name}; {REWRITE_HINT}")
        t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        want = t.numel() * t.element_size()
        if want != e.nbytes:
            raise LeanfmError(f"{e.file}: tensor {name} has {e.nbytes} bytes for shape {list(e.shape)} {e.dtype} ({want} expected); "
                              f"the file is corrupt: {REWRITE_HINT}")
        if want:
            with open(e.file, "rb", buffering=0) as f:
                got = read_exact(f.fileno(), memoryview(t.view(-1).view(torch.uint8).numpy()), e.start)
            if got != want:
                raise LeanfmError(f"{e.file}: tensor {name} is cut short ({got} of {want} bytes); the file is truncated: {REWRITE_HINT}")
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


class ShardWriter:
    """Writes tensors to ``<folder>/<stem>.safetensors`` one group at a time, then the index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, stem: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        name = f"{stem}.safetensors"
        dup = [k for k in tensors if k in self.weight_map]
        if dup:
            raise LeanfmError(f"internal: tensor {dup[0]} written twice (in {self.weight_map[dup[0]]} and {name})")
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(self.folder / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})
        self.total += sum(v.numel() * v.element_size() for v in tensors.values())

    def close(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
