"""The terminal table printed by ``leanfm bench`` / ``leanfm report``."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .columns import COLUMNS, cell, flag_text


def print_table(results: dict, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 200))
    env = results.get("environment", {})
    title = f"leanfm bench · {results.get('model', '')} · {results.get('protocol', {}).get('dataset', '')} · {env.get('threads')} threads"
    t = Table(title=title, show_lines=False)
    t.add_column("recipe", style="bold")
    present = [c for c in COLUMNS if any(c[0] in (r.get("metrics") or {}) for r in results["runs"])]
    for _, header, _ in present:
        t.add_column(header, justify="right")
    t.add_column("execution", overflow="fold")
    for run in results["runs"]:
        m = run.get("metrics") or {}
        t.add_row(run["recipe"]["name"], *[cell(m, k, f, run) for k, _, f in present], flag_text(run))
    console.print(t)
