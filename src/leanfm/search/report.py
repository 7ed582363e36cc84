"""``report.html`` of a search, built only from ``<out>/search.json`` (and the recipes under ``front/``).

One self-contained page (plotly.js inlined, nothing fetched): the search's header and counts; the
Pareto plot of the first two objectives, where every measured trial is a point (meeting the budget
or not), the Pareto set is its own trace, named :data:`PARETO_TRACE`, and each budget bound on a
plotted metric is drawn as a dashed line with the side it excludes shaded; a plot of each other
budgeted metric against the first objective; predicted against measured for every metric the
predictor gave; a table of all trials; and the Pareto set's recipes as YAML for ``leanfm compress``.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..errors import LeanfmError
from ..metrics import METRICS
from ..report.html import write_page
from ..results import read_json
from .budget import parse_budget

SCHEMA = "leanfm.search/1"
PARETO_TRACE = "Pareto set"  # the Pareto plot's trace holding exactly the front's points (tests find it by name)
PARETO_DIV = "pareto"  # the Pareto plot's element id

_CONFIG = {"displaylogo": False, "responsive": True}
_BLUE, _GREY, _RED, _ORANGE = "#1f77b4", "#9aa5b1", "#d62728", "#ff7f0e"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(metric: str, v) -> str:
    """A metric's value for people: bytes in MiB, fractions in %, else 4 significant digits."""
    x = _num(v)
    if x is None:
        return "–" if v is None else str(v)
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "bytes":
        return f"{x / 2 ** 20:.3f} MiB"
    if unit == "fraction":
        return f"{100 * x:.2f}%"
    if unit in ("×", "%"):
        return f"{x:.3g}{'x' if unit == '×' else '%'}"
    return f"{x:.4g}" + (f" {unit}" if unit not in ("", "–") else "")


def _steps(recipe: dict | None) -> str:
    """A recipe's steps on one line: ``layerdrop(fraction=0.15) + rtn(bits=4, group_size=None, ...)``."""
    steps = (recipe or {}).get("steps") or []
    if not steps:
        return "baseline (no step)"
    quiet = {"method", "skip", "only", "backend", "rounding", "count"}
    return " + ".join(f"{s.get('method', '?')}({', '.join(f'{k}={v}' for k, v in s.items() if k not in quiet and v is not None)})"
                      for s in steps)


def _axis(metric: str, direction: str | None = None) -> dict:
    unit = METRICS[metric].unit if metric in METRICS else ""
    arrow = {"max": " (higher is better)", "min": " (lower is better)"}.get(direction or "", "")
    ax = {"title": {"text": f"{metric}{'' if unit in ('', '–') else f' [{unit}]'}{arrow}"}, "zeroline": False}
    if unit == "bytes":
        ax.update(tickformat="~s", ticksuffix="B")
    elif unit == "fraction":
        ax.update(tickformat=".0%")
    return ax


def load(out_dir: str | Path) -> dict:
    """``out_dir/search.json``, or a one-line LeanfmError saying what is wrong with it."""
    p = Path(out_dir)
    p = p / "search.json" if p.is_dir() else p
    data = read_json(p, "search.json", "leanfm search")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("trials"), list):
        raise LeanfmError(f"{p} is not a search.json written by leanfm search (schema {SCHEMA}); "
                          "pass the directory of one")
    return data


def _objectives(res: dict) -> list[tuple[str, str]]:
    out = []
    for o in res.get("objectives") or []:
        metric, _, direction = str(o).partition(":")
        out.append((metric, direction or (METRICS[metric].better if metric in METRICS else "") or ""))
    return out


def _bounds(res: dict) -> list[tuple[str, str, float, str]]:
    """(metric, op, threshold in the metric's unit, the bound as written) of each budget bound that can be
    resolved (a relative bound needs the baseline's value of its metric)."""
    out = []
    for text in res.get("budget") or []:
        try:
            for c in parse_budget(str(text)):
                out.append((c.metric, c.op, c.resolve(res.get("baseline") or {}), str(text)))
        except LeanfmError:
            continue  # written by an older leanfm, or relative to a metric the baseline lacks: shown in the header only
    return out


def _baseline_value(res: dict, metric: str) -> float | None:
    v = _num((res.get("baseline") or {}).get(metric))
    if v is None:  # the ratios to the baseline are not stored for the baseline itself
        v = {"ppl_increase": 0.0, "speedup": 1.0, "compression_ratio": 1.0}.get(metric)
    return v


def _hover(t: dict, metrics: list[str], values: dict) -> str:
    lines = [f"<b>t{int(t['trial']):03d}</b> {html.escape(str((t.get('recipe') or {}).get('name', '')))}{_builtin(t)}",
             html.escape(_steps(t.get("recipe")))]
    lines += [f"{html.escape(m)}: {html.escape(_fmt(m, values.get(m)))}" for m in metrics]
    return "<br>".join(lines)


def _points(res: dict, trials: list[dict], x: str, y: str, shown: list[str]):
    xs, ys, text = [], [], []
    for t in trials:
        m = t.get("metrics") or {}
        if _num(m.get(x)) is None or _num(m.get(y)) is None:
            continue
        xs.append(float(m[x]))
        ys.append(float(m[y]))
        text.append(_hover(t, list(dict.fromkeys([x, y] + shown)), m))
    return xs, ys, text


def _scatter_fig(res: dict, x: str, xdir: str | None, y: str, ydir: str | None, title: str):
    import plotly.graph_objects as go

    objectives = [m for m, _ in _objectives(res)]
    shown = list(dict.fromkeys(objectives + [b[0] for b in _bounds(res)]))
    front = set(res.get("front") or [])
    measured = [t for t in res["trials"] if t.get("status") == "measured"]
    groups = [
        ("meets the budget", [t for t in measured if t.get("feasible") and t["trial"] not in front],
         dict(color=_BLUE, size=9, symbol="circle-open", line=dict(width=2))),
        ("over budget", [t for t in measured if not t.get("feasible")], dict(color=_GREY, size=8, symbol="x")),
    ]
    fig = go.Figure()
    for name, trials, marker in groups:
        xs, ys, text = _points(res, trials, x, y, shown)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=f"{name} ({len(xs)})", marker=marker, text=text,
                                 hovertemplate="%{text}<extra></extra>"))
    members = sorted((t for t in measured if t["trial"] in front), key=lambda t: (_num((t.get("metrics") or {}).get(x)) or 0.0))
    xs, ys, text = _points(res, members, x, y, shown)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=PARETO_TRACE, text=text,
                             marker=dict(color=_RED, size=13, symbol="star"), line=dict(color=_RED, width=1, dash="dot"),
                             hovertemplate="%{text}<extra></extra>"))
    bx, by = _baseline_value(res, x), _baseline_value(res, y)
    if bx is not None and by is not None:
        fig.add_trace(go.Scatter(x=[bx], y=[by], mode="markers", name="baseline",
                                 marker=dict(color="black", size=10, symbol="diamond"),
                                 text=[f"<b>baseline</b><br>{html.escape(x)}: {html.escape(_fmt(x, bx))}<br>"
                                       f"{html.escape(y)}: {html.escape(_fmt(y, by))}"],
                                 hovertemplate="%{text}<extra></extra>"))
    all_x = [v for tr in fig.data for v in (tr.x or ())]
    all_y = [v for tr in fig.data for v in (tr.y or ())]
    for metric, op, limit, text in _bounds(res):
        for axis, values in (("x", all_x), ("y", all_y)):
            if metric != (x if axis == "x" else y):
                continue
            lo, hi = min(values + [limit]), max(values + [limit])
            pad = (hi - lo) * 0.08 or abs(limit) * 0.1 or 1.0
            # shade the side the bound excludes, out to just past the data
            a, b = (limit, hi + pad) if op in ("<=", "<") else (lo - pad, limit)
            line = dict(color=_ORANGE, width=2, dash="dash")
            label = dict(text=f"budget: {html.escape(text)}", font=dict(color=_ORANGE, size=11))
            if axis == "x":
                fig.add_vrect(x0=a, x1=b, fillcolor=_ORANGE, opacity=0.08, line_width=0, layer="below")
                fig.add_vline(x=limit, line=line, annotation=label, annotation_position="top left")
            else:
                fig.add_hrect(y0=a, y1=b, fillcolor=_ORANGE, opacity=0.08, line_width=0, layer="below")
                fig.add_hline(y=limit, line=line, annotation=label, annotation_position="top left")
    fig.update_layout(title=dict(text=html.escape(title), font=dict(size=15)), template="plotly_white", height=520,
                      xaxis=_axis(x, xdir), yaxis=_axis(y, ydir), hoverlabel=dict(align="left"),
                      legend=dict(orientation="h", y=-0.18), margin=dict(l=70, r=30, t=60, b=40))
    return fig


def _prediction_fig(res: dict):
    """Predicted (x) against measured (y) for every metric the predictor gave and a trial measured, one panel
    each, with the identity line; None when there is no such pair."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = []
    for t in res["trials"]:
        for k in (t.get("predicted") or {}):
            if k not in metrics and _num(t["predicted"][k]) is not None and any(
                    _num((u.get("predicted") or {}).get(k)) is not None and _num((u.get("metrics") or {}).get(k)) is not None
                    for u in res["trials"]):
                metrics.append(k)
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[html.escape(m) for m in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.5 / rows)
    for i, m in enumerate(metrics):
        r, c = i // cols + 1, i % cols + 1
        xs, ys, text = [], [], []
        for t in res["trials"]:
            p, v = _num((t.get("predicted") or {}).get(m)), _num((t.get("metrics") or {}).get(m))
            if p is None or v is None:
                continue
            xs.append(p)
            ys.append(v)
            err = f"{100 * (p - v) / v:+.1f}%" if v else "–"
            text.append(f"<b>t{int(t['trial']):03d}</b> ({html.escape(str(t.get('status')))})<br>{html.escape(_steps(t.get('recipe')))}"
                        f"<br>predicted {html.escape(_fmt(m, p))}<br>measured {html.escape(_fmt(m, v))}<br>prediction error {err}")
        lo, hi = min(xs + ys), max(xs + ys)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0  # the same range on both axes, so the identity is the diagonal
        lo, hi = lo - pad, hi + pad
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured", showlegend=i == 0,
                                 legendgroup="identity", line=dict(color=_GREY, dash="dot"), hoverinfo="skip"), row=r, col=c)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="trial", showlegend=i == 0, legendgroup="trial",
                                 marker=dict(color=_BLUE, size=8), text=text, hovertemplate="%{text}<extra></extra>"),
                      row=r, col=c)
        fmt = _axis(m)
        for update, title in ((fig.update_xaxes, "predicted"), (fig.update_yaxes, "measured")):
            update(title_text=title, range=[lo, hi], tickformat=fmt.get("tickformat"), ticksuffix=fmt.get("ticksuffix"),
                   nticks=5, row=r, col=c)
    fig.update_layout(template="plotly_white", height=320 * rows, hoverlabel=dict(align="left"),
                      title=dict(text="Predicted (roofline, before running) vs measured, every trial measured", font=dict(size=15)),
                      margin=dict(l=60, r=30, t=80, b=40))
    return fig


def _table(res: dict) -> str:
    cols = list(dict.fromkeys([m for m, _ in _objectives(res)] + [b[0] for b in _bounds(res)]))
    front = set(res.get("front") or [])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", "status", "meets budget", "stage", "reused", "recipe"] + cols + ["reason"])
    rows = []
    for t in res["trials"]:
        m, p = t.get("metrics") or {}, t.get("predicted") or {}
        cells = []
        for c in cols:
            if c in m:
                cells.append(f"<td>{html.escape(_fmt(c, m[c]))}</td>")
            elif _num(p.get(c)) is not None:  # not measured: what the predictor said
                cells.append(f"<td class=pred title='predicted, not measured'>pred. {html.escape(_fmt(c, p[c]))}</td>")
            else:
                cells.append("<td>–</td>")
        status = str(t.get("status", "?"))
        star = " ★" if t["trial"] in front else ""
        rows.append(f"<tr class='{html.escape(status)}{' front' if star else ''}'><td>t{int(t['trial']):03d}{star}</td>"
                    f"<td>{html.escape(status)}</td><td>{'yes' if t.get('feasible') else 'no'}</td>"
                    f"<td>{html.escape(str(t.get('stage', '')))}</td><td>{'yes' if t.get('cached') else 'no'}</td>"
                    f"<td class=recipe>{html.escape(_steps(t.get('recipe')))}{_builtin(t)}</td>{''.join(cells)}"
                    f"<td class=reason>{html.escape(str(t.get('reason') or ''))}</td></tr>")
    return f"<table id=trials><tr>{head}</tr>{''.join(rows)}</table>"


def _builtin(t: dict) -> str:
    return f" <span class=builtin>(built-in {html.escape(str(t['builtin']))})</span>" if t.get("builtin") else ""


def _recipe_yaml(t: dict, front_dir: Path | None) -> str:
    import yaml

    name = str((t.get("recipe") or {}).get("name", f"search-t{int(t['trial']):03d}"))
    f = front_dir / f"{name}.yaml" if front_dir else None
    if f is not None and f.is_file():
        try:
            return f.read_text()
        except (OSError, UnicodeDecodeError):
            pass
    return yaml.safe_dump(t.get("recipe") or {}, sort_keys=False, default_flow_style=None)  # as Recipe.save writes it


def _chosen(res: dict, front_dir: Path | None) -> str:
    by = {t["trial"]: t for t in res["trials"]}
    members = [by[n] for n in res.get("front") or [] if n in by]
    if not members:
        return ("<p class=note>No measured candidate met the budget, so there is no recipe to choose; "
                "raise <code>--trials</code> or relax <code>--budget</code>.</p>")
    cols = list(dict.fromkeys([m for m, _ in _objectives(res)] + [b[0] for b in _bounds(res)]))
    model = str(res.get("model", "MODEL"))
    out = []
    for t in members:
        name = str((t.get("recipe") or {}).get("name", f"search-t{int(t['trial']):03d}"))
        path = f"{front_dir / (name + '.yaml')}" if front_dir else f"{name}.yaml"
        vals = " · ".join(f"{html.escape(c)} <b>{html.escape(_fmt(c, (t.get('metrics') or {}).get(c)))}</b>" for c in cols)
        cmd = f"leanfm compress --model {model} --recipe {path} --out {name}-checkpoint"
        out.append(f"<div class=recipe-card id='recipe-t{int(t['trial']):03d}'><h3>t{int(t['trial']):03d}: {html.escape(name)}{_builtin(t)}</h3>"
                   f"<p>{vals}</p><pre class=yaml>{html.escape(_recipe_yaml(t, front_dir))}</pre>"
                   f"<p class=note>saved as <code>{html.escape(path)}</code>; apply it with</p>"
                   f"<pre class=cmd>{html.escape(cmd)}</pre></div>")
    return "".join(out)


def render(res: dict, front_dir: str | Path | None = None) -> str:
    """The page for a search result (the dict in search.json); ``front_dir`` holds the Pareto set's
    recipe files (their text is shown as is), else the recipes are written out from search.json."""
    from plotly.offline import get_plotlyjs

    front_dir = Path(front_dir) if front_dir is not None else None
    objectives = _objectives(res)
    figs = []
    if len(objectives) >= 2:
        (x, xd), (y, yd) = objectives[0], objectives[1]
        figs.append((PARETO_DIV, _scatter_fig(res, x, xd, y, yd, f"Pareto front: {x} vs {y}")))
        plotted = {x, y}
        for metric, *_ in _bounds(res):  # each other budgeted metric against the first objective
            if metric not in plotted:
                plotted.add(metric)
                figs.append((f"budget-{metric}", _scatter_fig(res, metric, METRICS[metric].better if metric in METRICS else None,
                                                              x, xd, f"{metric} (budget) vs {x}")))
    elif objectives:
        (y, yd) = objectives[0]
        figs.append((PARETO_DIV, _scatter_fig(res, "weight_bytes", "min", y, yd, f"Pareto front: {y} (weight bytes for reference)")))
    pred = _prediction_fig(res)
    if pred is not None:
        figs.append(("predicted-vs-measured", pred))
    divs = {div: fig.to_html(full_html=False, include_plotlyjs=False, div_id=div, config=_CONFIG) for div, fig in figs}

    c = res.get("counts") or {}
    model = html.escape(str(res.get("model", "")))
    budget = html.escape(", ".join(map(str, res.get("budget") or [])) or "none")
    objs = html.escape(", ".join(map(str, res.get("objectives") or [])))
    n_front = len(res.get("front") or [])
    counts = (f"{int(res.get('trials_requested', len(res['trials'])))} trials: <b>{c.get('rejected', 0)}</b> rejected by the predictor, "
              f"<b>{c.get('invalid', 0)}</b> invalid, <b>{c.get('stopped', 0)}</b> stopped after the short quality pass, "
              f"<b>{c.get('measured', 0)}</b> measured, <b>{c.get('failed', 0)}</b> failed; "
              f"<b>{res.get('measured_now', 0)}</b> measurements made now, <b>{res.get('cached', 0)}</b> reused from the store; "
              f"<b>{n_front}</b> in the Pareto set")
    pareto = divs.get(PARETO_DIV, "<p class=note>No objective to plot.</p>")
    others = "".join(v for k, v in divs.items() if k.startswith("budget-"))
    pvm = divs.get("predicted-vs-measured", "<p class=note>No trial has both a prediction and a measurement.</p>")
    protocol = html.escape(json.dumps(res.get("protocol", {}), indent=2))
    baseline = html.escape(json.dumps(res.get("baseline", {}), indent=2))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>leanfm search · {model}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px;width:100%}}
td,th{{border:1px solid #ccc;padding:3px 5px;text-align:right}}td:nth-child(-n+6),td.reason{{text-align:left}}
td.recipe,td.reason{{font-size:11px;overflow-wrap:anywhere}}td.pred{{color:#888;font-style:italic}}
tr.front td{{background:#fff1f0}}tr.rejected td,tr.invalid td,tr.failed td{{color:#777}}.wide{{overflow-x:auto}}
pre{{background:#f6f6f6;padding:1em;font-size:12px;overflow-x:auto}}.note{{color:#555;font-size:13px}}
.recipe-card{{border-left:4px solid {_RED};padding-left:1em;margin:1em 0}}dl{{display:grid;grid-template-columns:max-content auto;gap:2px 1em}}
dt{{color:#555}}dd{{margin:0}}</style></head><body>
<h1>leanfm search</h1>
<dl id=summary><dt>model</dt><dd><b>{model}</b></dd><dt>budget</dt><dd>{budget}</dd><dt>objectives</dt><dd>{objs}</dd>
<dt>trials</dt><dd id=counts>{counts}</dd>
<dt>search</dt><dd>{html.escape(str(res.get('search_id', ''))[:12])} · seed {html.escape(str(res.get('seed', '')))} · hardware {html.escape(str(res.get('hardware', '')))} · executor {html.escape(str(res.get('executor', '')))}</dd></dl>
<h2>Pareto front</h2>
<p class=note>Every measured trial is a point: stars are the Pareto set (meeting the budget, not dominated), hollow circles meet the
budget but are dominated, crosses miss it. Dashed lines are budget bounds, the shaded side is outside the budget. Hover a point for its recipe
and numbers.</p>
{pareto}{others}
<h2>Chosen recipes</h2>
<p class=note>The Pareto set's recipes, ready for <code>leanfm compress --recipe</code> or <code>leanfm bench --recipe</code>.</p>
{_chosen(res, front_dir)}
<h2>Predicted vs measured</h2>
<p class=note>The roofline predictor prices every candidate before it runs (rejected ones were never measured, so they are not here).</p>
{pvm}
<h2>All trials</h2>
<p class=note>★ marks the Pareto set; <i>pred.</i> is the predictor's value where the trial was not measured.</p>
<div class=wide>{_table(res)}</div>
<h2>Baseline</h2><pre>{baseline}</pre><h2>Protocol</h2><pre>{protocol}</pre></body></html>"""


def write_search_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/search.json`` atomically and return its path; a one-line
    LeanfmError when search.json cannot be read or the page cannot be written."""
    out = Path(out_dir)
    res = load(out)
    return write_page(out / "report.html", render(res, out / "front"),
                      f"make {out} writable or copy search.json and front/ to a writable directory and run leanfm report there")
