"""Locate (and, for split uploads, assemble) the GGUF file inside a model's PyPI package(s)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from pathlib import Path

from .. import progress
from ..errors import LeanfmError
from .registry import ModelSpec


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError(f"package '{name}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(alias: str, package: str, relpath: str, install: str) -> Path:
    """``relpath`` inside the installed ``package`` (a model shipped as a file in a package), or a
    one-line error naming ``install``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError(f"model '{alias}' is not installed (missing {package}); install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise LeanfmError(f"{package} is installed but has no {relpath}; reinstall it with: {install}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress.bar(f"sha256 {path.name}", size) as adv:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            adv(len(chunk))
    return h.hexdigest()


def _concat(parts: list[Path], dest: Path) -> None:
    total = sum(p.stat().st_size for p in parts)
    tmp = dest.with_suffix(".partial")
    with open(tmp, "wb") as out, progress.bar(f"assembling {dest.name}", total) as adv:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
                    adv(len(chunk))
    os.replace(tmp, dest)


def gguf_path(spec: ModelSpec, workdir: Path) -> Path:
    """Return the path of the model's single GGUF file, assembling it into ``workdir`` if split."""
    spec.require_installed()
    if spec.layout == "file":
        direct = _package_dir(spec.packages[0]) / spec.gguf_name
        if not direct.exists():
            raise LeanfmError(f"{direct} is missing; reinstall with: {spec.install}")
        return direct
    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / spec.gguf_name
    if spec.layout == "assemble":
        # The package joins its chunk packages itself and checks their sha256.
        mod = importlib.import_module(spec.packages[0])
        with progress.bar(f"assembling {dest.name}", None):
            return Path(mod.assemble(str(dest), overwrite=True))
    # "parts": each package exposes get_part_path(); concatenate in the listed (numeric) order.
    parts = [Path(importlib.import_module(p).get_part_path()) for p in spec.packages]
    _concat(parts, dest)
    return dest


def remove_assembled(path: Path, workdir: Path) -> None:
    """Delete an assembled GGUF once the fp32 cache exists (package files are left alone)."""
    if path.parent == workdir and path.exists():
        path.unlink()
    if workdir.exists() and not any(workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)
