"""Output folders of ``bench`` / ``eval``: never overwrite results silently, one writer at a time.

A folder that already holds leanfm results (``results.json``) is refused unless the user asks
for ``overwrite``; then leanfm's own files in it (results, report, saved recipes) are removed
first, so no stale file from the earlier run survives next to the new results. While a run
writes, it holds an exclusive ``flock`` on ``<out>/.leanfm.lock``; a second run aimed at the same
folder is refused at once instead of interleaving its results with the first. The kernel
drops the lock when the process ends, however it ends, so a crash leaves no stale lock (the
empty lock file itself stays).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from .errors import LeanfmError, os_reason

LOCK = ".leanfm.lock"
OWN_FILES = ("results.json", "results.json.partial", "report.html")  # what bench/eval write
OWN_DIRS = ("recipes",)


def default_out(kind: str) -> Path:
    """``runs/<kind>-<timestamp>``, with a suffix when a run in the same second took the name."""
    base = Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 2
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out




class OutputDir:
    """Claim ``out`` for one run: checks, clears (with ``overwrite``) and locks it.

    Use as a context manager around the run; the lock is released on exit.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, flag: str = "--out"):
        self.path = Path(out)
        self.overwrite = overwrite
        self.flag = flag
        self._fd: int | None = None

    def __enter__(self) -> Path:
        p = self.path
        if p.exists() and not p.is_dir():
            raise LeanfmError(f"{self.flag} {p} is a file, not a folder; pass a folder path for the results")
        try:
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LeanfmError(f"cannot write to {self.flag} {p}: {os_reason(e)}; choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LeanfmError(f"another leanfm run (pid {holder}) is writing to {p}; wait for it to finish or choose another {self.flag}") from None
        self._fd = fd
        try:
            self._clear_or_refuse()
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return p

    def _clear_or_refuse(self) -> None:
        p = self.path
        if not (p / "results.json").exists():
            return
        if not self.overwrite:
            raise LeanfmError(f"{self.flag} {p} already holds results (results.json); pass --overwrite to replace them, "
                              f"or choose another {self.flag}")
        try:
            for name in OWN_FILES:
                (p / name).unlink(missing_ok=True)
            for name in OWN_DIRS:
                shutil.rmtree(p / name, ignore_errors=True)
        except OSError as e:
            raise LeanfmError(f"cannot clear the earlier results in {p}: {os_reason(e)}") from None

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            # The lock file stays: unlinking it would let a run that opened it just before hold a
            # lock on a deleted file while a third run locks a new one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
