"""The load-test report (``kind: loadtest`` results): a table per setup and rate, each setup's
capacity under the SLO, and latency-vs-rate plots (TTFT and TPOT p50/p99, throughput and goodput).

A results file holds one run per (setup, rate); the setup is the run's ``recipe.name`` (``leanfm
loadtest --label``), so one file can compare several servers or recipes at the same rates.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

# a rate counts as sustained when at least this share of its requests met every SLO bound
DEFAULT_ATTAINMENT = 0.9


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def by_setup(results: dict) -> dict[str, list[dict]]:
    """Setup name -> its runs sorted by arrival rate (``inf`` last)."""
    out: dict[str, list[dict]] = {}
    for r in results.get("runs") or []:
        out.setdefault(str((r.get("recipe") or {}).get("name", "?")), []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: float((r.get("metrics") or {}).get("arrival_rate", r.get("rate", 0)) or 0))
    return out


def capacity(runs: list[dict], attainment: float = DEFAULT_ATTAINMENT) -> float | None:
    """The highest arrival rate whose SLO attainment reached ``attainment`` (0.0 when none did);
    None when the runs carry no SLO (no ``slo_attainment``)."""
    pts = [((r.get("metrics") or {}).get("arrival_rate"), (r.get("metrics") or {}).get("slo_attainment")) for r in runs]
    pts = [(rate, att) for rate, att in pts if isinstance(rate, (int, float)) and _num(att)]
    if not pts:
        return None
    ok = [rate for rate, att in pts if att >= attainment]
    return max(ok) if ok else 0.0


def _is_inf(rate) -> bool:
    return isinstance(rate, float) and math.isinf(rate)


def _rate_text(rate) -> str:
    return "inf" if _is_inf(rate) else f"{rate:g}"


def rows(results: dict) -> list[list[str]]:
    """Table rows: setup, rate, completed/sent, TTFT p50/p99, TPOT p50/p99, req/s, tok/s, goodput, attainment."""
    def ms(v):
        return "–" if not _num(v) else f"{v:.0f}"

    out = []
    for name, runs in by_setup(results).items():
        for r in runs:
            m = r.get("metrics") or {}
            out.append([name, _rate_text(m.get("arrival_rate", r.get("rate"))), f"{m.get('completed', 0)}/{m.get('requests', 0)}",
                        f"{ms(m.get('ttft_ms_p50'))} / {ms(m.get('ttft_ms_p99'))}", f"{ms(m.get('tpot_ms_p50'))} / {ms(m.get('tpot_ms_p99'))}",
                        f"{m.get('request_throughput', 0):.2f}", f"{m.get('output_token_throughput', 0):.1f}",
                        f"{m['goodput']:.2f}" if _num(m.get("goodput")) else "–",
                        f"{m['slo_attainment']:.2f}" if _num(m.get("slo_attainment")) else "–"])
    return out


HEADERS = ["setup", "rate req/s", "ok", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "req/s", "output tok/s", "goodput req/s",
           "SLO attainment"]


def _plots(results: dict) -> str | None:
    """One PNG with three panels against arrival rate; ``inf`` sits one step right of the largest
    finite rate and is labelled so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = by_setup(results)
    finite = sorted({float(m["arrival_rate"]) for runs in setups.values() for r in runs
                     for m in [r.get("metrics") or {}] if _num(m.get("arrival_rate"))})
    if not any(setups.values()):
        return None
    inf_x = (finite[-1] * 2) if finite else 1.0

    def x_of(m):
        rate = m.get("arrival_rate")
        return inf_x if _is_inf(rate) else rate

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    panels = [("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), (None, "req/s")]
    for ax, (key, label) in zip(axes, panels):
        for k, (name, runs) in enumerate(setups.items()):
            ms = [r.get("metrics") or {} for r in runs]
            xs = [x_of(m) for m in ms]
            color = f"C{k % 10}"
            if key:
                for pct, style in (("p50", "-o"), ("p99", "--^")):
                    pts = [(x, m.get(f"{key}_{pct}")) for x, m in zip(xs, ms) if _num(m.get(f"{key}_{pct}"))]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, label=f"{name} {pct}", markersize=4)
            else:
                pts = [(x, m.get("request_throughput")) for x, m in zip(xs, ms) if _num(m.get("request_throughput"))]
                if pts:
                    ax.plot(*zip(*pts), "-o", color=color, label=f"{name} throughput", markersize=4)
                pts = [(x, m.get("goodput")) for x, m in zip(xs, ms) if _num(m.get("goodput"))]
                if pts:
                    ax.plot(*zip(*pts), ":s", color=color, label=f"{name} goodput", markersize=4)
        bound = ((results.get("protocol") or {}).get("slo_ms") or {}).get(key.split("_")[0]) if key else None
        if _num(bound):
            ax.axhline(bound, color="red", linewidth=0.8, label=f"SLO {bound:g} ms")
        ax.set_xscale("log")
        has_inf = any(_is_inf((r.get("metrics") or {}).get("arrival_rate")) for rs in setups.values() for r in rs)
        ticks = finite + ([inf_x] if has_inf else [])
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels(["inf" if has_inf and t == inf_x else _rate_text(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
        ax.set_xlabel("arrival rate, req/s")
        ax.set_ylabel(label)
        if key:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render(results: dict, attainment: float = DEFAULT_ATTAINMENT) -> str:
    proto = results.get("protocol") or {}
    slo = proto.get("slo_ms") or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows(results))
    caps = []
    for name, runs in by_setup(results).items():
        c = capacity(runs, attainment)
        if c is not None:
            caps.append(f"<li><b>{html.escape(name)}</b>: {_rate_text(c)} req/s</li>")
    cap_html = (f"<h2>Capacity</h2><p class=note>highest arrival rate at which at least {attainment:.0%} of the requests met "
                f"every SLO bound ({html.escape(', '.join(f'{k} {v:g} ms' for k, v in slo.items()))}); only the rates tried</p>"
                f"<ul>{''.join(caps)}</ul>") if caps else ""
    png = _plots(results)
    img = f'<img alt="latency and throughput vs arrival rate" src="data:image/png;base64,{png}">' if png else ""
    env = html.escape(json.dumps(results.get("environment", {}), indent=2))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>leanfm load test</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child{{text-align:left}}
pre{{background:#f6f6f6;padding:1em;font-size:12px}}.note{{color:#555;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>leanfm load test</h1><p>{html.escape(str(proto.get('url', '')))} · results schema {html.escape(str(results.get('schema_version')))}</p>
<table><tr>{head}</tr>{body}</table>
{cap_html}
<div>{img}</div>
<h2>Protocol</h2><pre>{html.escape(json.dumps(proto, indent=2))}</pre><h2>Environment</h2><pre>{env}</pre></body></html>"""


def write_loadtest_report(results: dict, out_dir: str | Path, attainment: float = DEFAULT_ATTAINMENT) -> Path:
    """Write ``out_dir/report.html`` for load-test results; a one-line LeanfmError when it cannot."""
    from .html import write_page

    return write_page(Path(out_dir) / "report.html", render(results, attainment),
                      f"make {Path(out_dir)} writable or copy results.json to a writable directory and run leanfm report there")


def print_loadtest_table(results: dict, attainment: float = DEFAULT_ATTAINMENT) -> None:
    """The terminal form of the same table and capacities (``leanfm report`` on a load test)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    t = Table(title=f"leanfm loadtest · {(results.get('protocol') or {}).get('url', '')}")
    for k, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if k == 0 else "right")
    for row in rows(results):
        t.add_row(*row)
    console.print(t)
    for name, runs in by_setup(results).items():
        c = capacity(runs, attainment)
        if c is not None:
            console.print(f"capacity of {name}: {_rate_text(c)} req/s (highest rate tried with SLO attainment >= {attainment:g})",
                          markup=False, highlight=False)
