"""Layers point one way: a module imports only from its own layer or the layers below it.

    base (errors, progress, sysinfo, _callable, allocator)
      <- formats (quantized weight, packed layouts, checkpoint files)
      <- kernels
      <- models, data
      <- methods (with the registry: config, recipe)
      <- measure, predict, report, results, metrics
      <- bench, api, outdir, search
      <- cli, the package's lazy exports

Every import in src/ counts, including those inside functions (``ast`` reads them all).
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "leanfm"

LEVEL = {
    "errors": 0, "progress": 0, "sysinfo": 0, "_callable": 0, "allocator": 0,
    "formats": 1,
    "kernels": 2,
    "models": 3, "data": 3, "runtimes": 3,
    "methods": 4, "config": 4, "recipe": 4, "recipes": 4, "space": 4,
    "measure": 5, "predict": 5, "report": 5, "results": 5, "hardware": 5, "metrics": 5,
    "bench": 6, "bench_vision": 6, "bench_diffusion": 6, "api": 6, "outdir": 6, "search": 6, "onload_compress": 6, "training": 6, "serving": 6,
    "cli": 7, "__init__": 7, "__main__": 7,
}


def _top(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, src: Path = SRC) -> list[str]:
    """Absolute ``leanfm.*`` module names ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if node.module is None or mod == "leanfm":  # `from . import progress`, `from leanfm import x`
                out += [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(mod)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.startswith("leanfm.")]


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src.parent).with_suffix("")
        me = "__init__" if len(rel.parts) == 2 and rel.parts[1] == "__init__" else rel.parts[1]
        assert me in LEVEL, f"{f} is in no layer: add its top-level name to LEVEL"
        for m in imports_of(f, src):
            other = _top(m)
            assert other in LEVEL, f"{f} imports {m}, which is in no layer"
            if LEVEL[other] > LEVEL[me]:
                bad.append(f"{'.'.join(rel.parts)} imports {m} ({me} is below {other})")
    return bad


def test_imports_point_one_way():
    assert violations() == []


def test_the_check_catches_a_wrong_way_import(tmp_path):
    """The reverted state of one fixed import (kernels reading QuantizedWeight from methods/)
    is reported."""
    pkg = tmp_path / "leanfm"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "methods").mkdir()
    (pkg / "kernels" / "qlinear.py").write_text("from ..methods.quantize.grid import QuantizedWeight\n")
    (pkg / "methods" / "fine.py").write_text("from ..kernels import qlinear\nfrom .. import progress\n")
    assert violations(pkg) == ["leanfm.kernels.qlinear imports leanfm.methods.quantize.grid (kernels is below methods)"]


def test_no_lazy_import_of_a_private_name_across_layers():
    """Other layers use a module's public names (``_act_bits`` was read by models/load.py)."""
    bad = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.level > 1:
                bad += [f"{f.relative_to(SRC)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
