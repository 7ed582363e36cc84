"""Rich progress bars shared by the CLI and the API (to stderr, so stdout stays parseable)."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("LEANFM_PROGRESS", "1") != "0"


@contextlib.contextmanager
def bar(description: str, total: float | None):
    """Yield an ``advance(n=1)`` callable driving one progress bar."""
    if not enabled():
        yield lambda n=1: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=not sys.stderr.isatty()) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def info(msg: str) -> None:
    if enabled():
        console.print(msg, highlight=False)
