"""Energy per token from hardware counters where readable, else power model x time.

Counters: Intel/AMD RAPL package energy (``/sys/class/powercap/*/energy_uj``) on the CPU,
NVML total energy on an NVIDIA GPU. Without either, energy = profile ``power_w`` x measured
decode time and ``energy_source`` is ``"estimated"``.
"""
from __future__ import annotations

import glob
from pathlib import Path

import torch

_RAPL = "/sys/class/powercap/*/energy_uj"


def _rapl_files() -> list[Path]:
    files = []
    for f in sorted(glob.glob(_RAPL)):
        p = Path(f)
        # package-level domains only (intel-rapl:0, not intel-rapl:0:0 sub-domains)
        if p.parent.name.count(":") == 1:
            try:
                int(p.read_text())
                files.append(p)
            except (OSError, ValueError):
                pass
    return files


class EnergyMeter:
    """Accumulates energy over timed blocks via ``add(seconds, tokens)`` and ``start/stop`` reads."""

    def __init__(self, power_w: float):
        self.power_w = power_w
        self.rapl = _rapl_files()
        self.nvml = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:  # noqa: BLE001 - NVML is optional
                self.nvml = None
        self.source = "nvml" if self.nvml else ("rapl" if self.rapl else "estimated")
        self.seconds = 0.0
        self.tokens = 0
        self.joules = 0.0

    def _read(self) -> float | None:
        if self.nvml is not None:
            import pynvml

            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.nvml) / 1e3
        if self.rapl:
            return sum(int(p.read_text()) for p in self.rapl) / 1e6
        return None

    def begin(self) -> None:
        self._start = self._read()

    def add(self, seconds: float, tokens: int) -> None:
        """Close one timed block of ``seconds`` that produced ``tokens``."""
        end = self._read()
        if end is not None and self._start is not None:
            self.joules += max(end - self._start, 0.0)
        else:
            self.joules += self.power_w * seconds
        self.seconds += seconds
        self.tokens += tokens
        self._start = self._read()

    def metrics(self) -> dict:
        if not self.tokens:
            return {}
        return {"energy_j_per_token": self.joules / self.tokens, "energy_source": self.source}
