"""``report.html``: the results table, plots of perplexity vs weight bytes and vs decode speed,
the environment, and the caveats. Self-contained (plots embedded as PNG)."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

from .columns import MiB, cell, flag_text, footnotes, present_columns

CAVEAT = (
    "Packaged checkpoints were published as 4-bit GGUF (SmolLM2: Q4_1, blocks of 32); the fp32 baseline "
    "is real pretrained quality but already sits on that grid, so group-32 RTN can look falsely lossless. "
    "Runs flagged <b>simulated</b> hold fake-quantized fp32 weights: their memory and speed are those of fp32. "
    "A speedup marked <b>noisy</b> is not trustworthy: its repeats overlap the baseline's, or other processes "
    "took cores the run needed (the reason is on the line under the row)."
)


def _scatter(runs: list[dict], xkey: str, xlabel: str, scale: float = 1.0) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v != 0

    pts = [(r["metrics"][xkey] / scale, r["metrics"]["perplexity"], r) for r in runs
           if r.get("status") == "ok" and num((r.get("metrics") or {}).get(xkey)) and num((r.get("metrics") or {}).get("perplexity"))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for k, (x, y, r) in enumerate(pts):
        sim = (r.get("flags") or {}).get("simulated")
        d = r.get("details") or {}
        if num(d.get(f"{xkey}_min")) and num(d.get(f"{xkey}_max")):  # spread over repeats, so noise is visible next to the median
            ax.errorbar([x], [y], xerr=[[max(x - d[f"{xkey}_min"] / scale, 0.0)], [max(d[f"{xkey}_max"] / scale - x, 0.0)]], color="tab:blue", alpha=0.4)
        ax.scatter([x], [y], s=60, facecolors="none" if sim else "tab:blue", edgecolors="tab:blue")
        # stagger labels so coinciding points stay readable
        ax.annotate(str(r["recipe"]["name"]), (x, y), textcoords="offset points", xytext=(5, 4 - 11 * (k % 3)), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"perplexity vs {xlabel}  (hollow = simulated; bars = min-max over repeats)", fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render(results: dict) -> str:
    runs = results.get("runs") or []
    present = present_columns(runs)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in present)
    rows = "".join(  # the execution text on its own full-width row, so the table fits the page
        f"<tr><td rowspan=2>{html.escape(str((r.get('recipe') or {}).get('name', '?')))}</td>"
        + "".join(f"<td>{html.escape(cell(r.get('metrics') or {}, k, f, r, runs))}</td>" for k, _, f in present)
        + f"</tr><tr class=exec><td colspan={max(len(present), 1)}>{html.escape(flag_text(r))}</td></tr>"
        for r in runs
    )
    plots = []
    for key, label, scale in (("weight_bytes", "weight MiB", MiB), ("decode_tokens_per_s", "decode tokens/s", 1.0)):
        png = _scatter(runs, key, label, scale)
        if png:
            plots.append(f'<img alt="perplexity vs {label}" src="data:image/png;base64,{png}">')
    notes = "".join(f'<p class="note energy">{html.escape(line)}</p>' for line in footnotes(results))
    env = html.escape(json.dumps(results.get("environment", {}), indent=2))
    proto = html.escape(json.dumps(results.get("protocol", {}), indent=2))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>leanfm report · {html.escape(str(results.get('model', '')))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px;width:100%}}
td,th{{border:1px solid #ccc;padding:3px 5px;text-align:right}}td:first-child{{text-align:left}}
tr.exec td{{text-align:left;color:#444;font-size:11px;overflow-wrap:anywhere}}.wide{{overflow-x:auto}}
pre{{background:#f6f6f6;padding:1em;font-size:12px}}img{{margin:1em 1em 0 0}}.note{{color:#555;font-size:13px}}</style></head><body>
<h1>leanfm report</h1><p>model <b>{html.escape(str(results.get('model', '')))}</b> · results schema {html.escape(str(results.get('schema_version')))}</p>
<div class="wide"><table><tr><th>recipe</th>{head}</tr>{rows}</table></div>
{notes}
<p class="note">{CAVEAT}</p>
<div>{''.join(plots)}</div>
<h2>Protocol</h2><pre>{proto}</pre><h2>Environment</h2><pre>{env}</pre></body></html>"""


def write_page(path: Path, text: str, fix: str) -> Path:
    """Write ``text`` to ``path`` atomically (a partial file, then a rename); a one-line
    LeanfmError ending in ``fix`` when it cannot be written."""
    from ..errors import LeanfmError

    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise LeanfmError(f"cannot write {path}: {e.strerror or type(e).__name__}; {fix}") from None
    return path


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` atomically; a one-line LeanfmError when it cannot be written."""
    return write_page(Path(out_dir) / "report.html", render(results),
                      f"make {Path(out_dir)} writable or copy results.json to a writable directory and run leanfm report there")
