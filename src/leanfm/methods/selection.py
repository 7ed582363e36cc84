"""Which layer names a technique's ``skip`` / ``only`` patterns select (no torch: the cost
predictor reads the same rule as ``targets.iter_linears``)."""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Sequence


def matches(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch against the full qualified name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, p) or fnmatch(leaf, p) for p in patterns)


def selected(name: str, skip: Sequence[str] = ("lm_head",), only: Sequence[str] = ()) -> bool:
    """Not matched by ``skip`` and, when ``only`` is given, matched by one of its patterns."""
    return not matches(name, skip) and (not only or matches(name, only))
