"""The terminal table printed by ``leanfm bench`` / ``leanfm report``."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .columns import cell, flag_text, footnotes, present_columns


def print_table(results: dict, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 200))
    env = results.get("environment") or {}
    runs = results.get("runs") or []
    proto = results.get("protocol") or {}
    data = "fashion-mnist" if (runs and ((runs[0].get("details") or {}).get("protocol") == "vit")) else proto.get("dataset", "")
    title = f"leanfm {results.get('kind', 'bench')} · {results.get('model', '')} · {data} · {env.get('threads')} threads"
    t = Table(title=title, show_lines=False)
    t.add_column("recipe", style="bold")
    present = present_columns(runs)
    for _, header, _ in present:
        t.add_column(header, justify="right")
    t.add_column("execution", overflow="fold")
    for run in runs:
        m = run.get("metrics") or {}
        t.add_row(str((run.get("recipe") or {}).get("name", "?")), *[cell(m, k, f, run, runs) for k, _, f in present],
                  flag_text(run))
    console.print(t)
    for line in footnotes(results):
        console.print(line, markup=False, highlight=False)
