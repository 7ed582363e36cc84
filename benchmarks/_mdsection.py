"""Replace one marked section of docs/benchmarks.md with freshly measured output."""
from __future__ import annotations

from pathlib import Path


def write_section(path: str | Path, key: str, body: str) -> None:
    p = Path(path)
    text = p.read_text() if p.exists() else "# Benchmarks\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    p.write_text(text)
