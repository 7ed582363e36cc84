"""How busy the CPU was during a timed block, and how much of that was someone else.

Linux only (``/proc/stat`` for all CPUs, ``/proc/self/stat`` for this process; both in clock
ticks). ``other_busy_cores`` is the CPU time of every other process during the block divided by
its wall time: 1.0 means another job kept one core busy throughout. Elsewhere the readings are
None and nothing is flagged from them.
"""
from __future__ import annotations

import os
import time


def _ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, this process's user + system ticks)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy, int(fields[11]) + int(fields[12])  # utime, stime


class CpuLoad:
    """``with CpuLoad() as load: ...`` then ``load.self_busy_cores``, ``load.other_busy_cores``."""

    def __enter__(self):
        self.self_busy_cores = self.other_busy_cores = None
        self._t0, self._ticks0 = time.perf_counter(), _ticks()
        return self

    def __exit__(self, *exc):
        end = _ticks()
        wall = time.perf_counter() - self._t0
        if end is None or self._ticks0 is None or wall <= 0:
            return False
        hz = os.sysconf("SC_CLK_TCK")
        total = (end[0] - self._ticks0[0]) / hz / wall
        mine = (end[1] - self._ticks0[1]) / hz / wall
        self.self_busy_cores = round(mine, 3)
        self.other_busy_cores = round(max(total - mine, 0.0), 3)
        return False


def contention(other_busy_cores: list[float | None], threads: int) -> str | None:
    """Why timings taken with these readings are not trustworthy (None when they are): other
    processes held more of the machine than the run could spare (median over repeats)."""
    vals = sorted(v for v in other_busy_cores if v is not None)
    if not vals:
        return None
    med = vals[len(vals) // 2]
    spare = max((os.cpu_count() or 1) - threads, 0)
    if med > spare + 0.5:
        return f"other processes kept {med:.1f} of {os.cpu_count()} cores busy while it ran on {threads} threads"
    return None
