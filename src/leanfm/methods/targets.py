"""Which modules a technique touches: a generic walk over a model's ``nn.Linear`` layers.

No per-family code: any decoder that uses ``nn.Linear`` projections is covered. ``skip`` holds
name patterns (fnmatch-style, matched against the last name component and the full name).
"""
from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

from .selection import selected


def iter_linears(model: nn.Module, skip: Sequence[str] = ("lm_head",), only: Sequence[str] = ()) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(qualified_name, module)`` for each ``nn.Linear`` not matched by ``skip``
    (and, when ``only`` is given, matched by one of its patterns)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and selected(name, skip, only):
            yield name, mod
