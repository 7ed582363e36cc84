"""The ``environment`` block of results.json: what ran where, and how loaded the machine was."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..sysinfo import cpu_model


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def environment(threads: int, seed: int | None = None) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("leanfm", "torch", "transformers", "safetensors", "numpy")},
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "seed": seed,
        "command": " ".join(sys.argv),
    }
