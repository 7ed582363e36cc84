"""Progress shared by the CLI and the API, on stderr so stdout stays parseable.

On a terminal: rich progress bars. Otherwise (logs, CI, ``nohup``): plain lines, one when a
task starts, then at most one every ``LEANFM_PROGRESS_EVERY`` seconds (default 30) and one when
it ends, so a long run is never silent. ``LEANFM_PROGRESS=0`` turns both off.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("LEANFM_PROGRESS", "1") != "0"


def _plain_every() -> float:
    try:
        return float(os.environ.get("LEANFM_PROGRESS_EVERY", "30"))
    except ValueError:
        return 30.0


def _num(x: float) -> str:
    """A count as people write it: whole numbers in full (45458100, not 4.54581e+07)."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"


@contextlib.contextmanager
def _plain(description: str, total: float | None):
    start = last = time.monotonic()
    done = 0.0
    of = f"/{_num(total)}" if total else ""
    print(f"{description}: started ({_num(total)} steps)" if total else f"{description}: started", file=sys.stderr, flush=True)

    shown = ""

    def advance(n: float = 1, status: str | None = None) -> None:
        nonlocal done, last, shown
        done += n
        shown = status if status is not None else shown
        now = time.monotonic()
        if now - last >= _plain_every() and (not total or done < total):
            last = now
            print(f"{description}: {_num(done)}{of} after {now - start:.0f} s{', ' + shown if shown else ''}", file=sys.stderr, flush=True)

    yield advance
    print(f"{description}: done {_num(done)}{of} in {time.monotonic() - start:.1f} s{', ' + shown if shown else ''}",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def bar(description: str, total: float | None):
    """Yield an ``advance(n=1, status=None)`` callable driving one progress bar (plain lines off a
    terminal); ``status`` is a short text shown beside the bar until the next one (e.g. the loss)."""
    if not enabled():
        yield lambda n=1, status=None: None
        return
    if not console.is_terminal:
        with _plain(description, total) as adv:
            yield adv
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}")]
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total, status="")

        def advance(n: float = 1, status: str | None = None) -> None:
            p.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance


def info(msg: str) -> None:
    if enabled():
        console.print(msg, highlight=False, soft_wrap=True)
