"""The search report (``leanfm report DIR`` on a ``leanfm search`` directory): one self-contained page,
checked as HTML here and in headless Chromium (Debian's ``chromium``, driven by playwright), which also
writes the screenshot in docs/."""
from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from leanfm import cli
from leanfm.errors import LeanfmError
from leanfm.recipe import parse_recipe
from leanfm.search.report import PARETO_DIV, PARETO_TRACE, write_search_report

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOSTILE = "<script>alert('x')</script> & \"quoted\""  # a reason that must come out as text


def _metrics(tps: float, ppl_inc: float, wb: int, **extra) -> dict:
    return {"decode_tokens_per_s": tps, "ppl_increase": ppl_inc, "weight_bytes": wb, "perplexity": 20.0 * (1 + ppl_inc),
            "tpot_ms_p50": 1000.0 / tps, "energy_source": "estimated", **extra}


def _predicted(tps: float, wb: int) -> dict:
    return {"decode_tokens_per_s": tps, "weight_bytes": wb, "tpot_ms_p50": 1000.0 / tps}


def _trial(n, status, steps, metrics=None, predicted=None, feasible=False, reason="", stage=2, cached=False, name=None):
    return {"trial": n, "params": {}, "recipe": {"name": name or f"t{n:03d}", "seed": 0, "steps": steps,
                                                  "description": "drawn by leanfm search"},
            "status": status, "reason": reason, "predicted": predicted or {}, "metrics": metrics or {}, "stage": stage,
            "cached": cached, "feasible": feasible}


RTN4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "skip": ["lm_head"]}
RTN8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "skip": ["lm_head"]}
DROP = {"method": "layerdrop", "fraction": 0.25, "count": None}
MAG = {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"}


def search_result() -> dict:
    """A search of 6 trials: 3 measured within the budget (2 of them the Pareto set), 1 measured over it,
    1 rejected by the predictor, 1 stopped after the short quality pass."""
    trials = [
        _trial(0, "measured", [RTN8], _metrics(62.0, 0.05, 260_000), _predicted(70.0, 255_000), feasible=True),
        _trial(1, "measured", [RTN4], _metrics(81.5, 0.04, 150_000), _predicted(95.0, 150_000), feasible=True,
               name="search-t001"),
        _trial(2, "rejected", [MAG], predicted=_predicted(52.0, 1_000_000), stage=0,
               reason=f"predicted weight_bytes 1e+06 misses weight_bytes <= 0.5x {HOSTILE}"),
        _trial(3, "measured", [DROP, RTN4], _metrics(120.0, 0.35, 110_000), _predicted(130.0, 112_000),
               reason="ppl_increase <= 20% missed: 0.35", cached=True),
        _trial(4, "stopped", [DROP], {"perplexity": 40.0, "ppl_increase": 1.0, "weight_bytes": 750_000},
               _predicted(65.0, 750_000), stage=1, reason="ppl_increase 1 misses ppl_increase <= 20% by more than 25%"),
        _trial(5, "measured", [DROP, RTN8], _metrics(104.0, 0.15, 200_000), _predicted(92.0, 195_000), feasible=True,
               name="search-t005"),
    ]
    return {
        "schema": "leanfm.search/1", "search_id": "ab" * 32, "model": "tiny-llama", "budget": ["weight_bytes <= 0.5x",
                                                                                              "ppl_increase <= 20%"],
        "objectives": ["decode_tokens_per_s:max", "ppl_increase:min"], "seed": 0, "trials_requested": 6, "population": 3,
        "protocol": {"dataset": "wikitext-2", "seqlen": 64}, "hardware": "local", "executor": "local",
        "counts": {"rejected": 1, "invalid": 0, "stopped": 1, "measured": 4, "failed": 0}, "measured_now": 4, "cached": 1,
        "baseline": {"decode_tokens_per_s": 50.0, "weight_bytes": 1_000_000, "perplexity": 20.0},
        "trials": trials, "front": [1, 5],
    }


def _write(tmp_path: Path, res: dict | None = None, front_files: bool = True) -> Path:
    res = res or search_result()
    (tmp_path / "search.json").write_text(json.dumps(res, indent=1))
    if front_files:
        (tmp_path / "front").mkdir(exist_ok=True)
        by = {t["trial"]: t for t in res["trials"]}
        for n in res["front"]:
            r = by[n]["recipe"]
            (tmp_path / "front" / f"{r['name']}.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    return tmp_path


def _front_points(res: dict) -> set[tuple[float, float]]:
    by = {t["trial"]: t for t in res["trials"]}
    return {(by[n]["metrics"]["decode_tokens_per_s"], by[n]["metrics"]["ppl_increase"]) for n in res["front"]}


def test_the_page_is_self_contained_and_holds_every_part(tmp_path):
    res = search_result()
    path = write_search_report(_write(tmp_path, res))
    assert path == tmp_path / "report.html"
    text = path.read_text()
    # self-contained: plotly.js inlined, nothing loaded from elsewhere
    assert "Plotly.newPlot" in text and len(text) > 1_000_000
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    page = text.split("</script>", 1)[1]  # after the inlined plotly.js (whose only URLs are for map plots)
    assert "cdn.plot.ly" not in page and "https://" not in page and "http://" not in page
    # header: model, budget, objectives, counts
    assert "tiny-llama" in text and "weight_bytes &lt;= 0.5x, ppl_increase &lt;= 20%" in text
    assert "decode_tokens_per_s:max, ppl_increase:min" in text
    counts = re.search(r"<dd id=counts>(.*?)</dd>", text).group(1)
    for words in ("<b>1</b> rejected by the predictor", "<b>1</b> stopped", "<b>4</b> measured", "<b>4</b> measurements made now",
                  "<b>1</b> reused from the store", "<b>2</b> in the Pareto set"):
        assert words in counts
    # the plots: Pareto front, the other budgeted metric, predicted vs measured
    for div in (PARETO_DIV, "budget-weight_bytes", "predicted-vs-measured"):
        assert f'id="{div}"' in text
    assert f'"name":"{PARETO_TRACE}"' in text
    # a table row per trial, with status and reason; text escaped everywhere
    table = re.search(r"<table id=trials>(.*?)</table>", text, re.S).group(1)
    assert table.count("<tr class=") == 6
    assert html.escape(HOSTILE) in table and HOSTILE not in text
    assert "pred. 0.954 MiB" in table  # the rejected trial shows what the predictor said
    # the chosen recipes: YAML a recipe parser accepts, equal to the front's
    blocks = re.findall(r"<pre class=yaml>(.*?)</pre>", text, re.S)
    assert len(blocks) == 2
    by = {t["trial"]: t for t in res["trials"]}
    for n, block in zip(res["front"], blocks):
        loaded = yaml.safe_load(html.unescape(block))
        assert loaded["steps"] == by[n]["recipe"]["steps"]
        assert parse_recipe(html.unescape(block), "report").name == f"search-t{n:03d}"
    assert f"--recipe {tmp_path / 'front' / 'search-t001.yaml'}" in text


def test_recipes_come_from_search_json_when_front_files_are_gone(tmp_path):
    res = search_result()
    text = write_search_report(_write(tmp_path, res, front_files=False)).read_text()
    blocks = re.findall(r"<pre class=yaml>(.*?)</pre>", text, re.S)
    assert [yaml.safe_load(html.unescape(b))["name"] for b in blocks] == ["search-t001", "search-t005"]


def test_an_empty_front_says_so(tmp_path):
    res = search_result()
    res["front"] = []
    for t in res["trials"]:
        t["feasible"] = False
    text = write_search_report(_write(tmp_path, res)).read_text()
    assert "No measured candidate met the budget" in text and "<pre class=yaml>" not in text


def test_leanfm_report_builds_the_search_page(tmp_path, capsys):
    _write(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out
    assert PARETO_TRACE in (tmp_path / "report.html").read_text()


def test_a_search_json_of_another_kind_is_refused(tmp_path):
    (tmp_path / "search.json").write_text(json.dumps({"schema": "something/else", "trials": []}))
    with pytest.raises(LeanfmError, match="not a search.json written by leanfm search"):
        write_search_report(tmp_path)
    (tmp_path / "search.json").write_text("{not json")
    with pytest.raises(LeanfmError, match="not valid JSON"):
        write_search_report(tmp_path)


def _chromium() -> str | None:
    found = shutil.which("chromium")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_the_page_in_headless_chromium(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make test installs it: pip install -e '.[dev]')")
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install -y chromium)")
    res = search_result()
    path = write_search_report(_write(tmp_path, res))
    started = time.monotonic()
    messages, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(path.as_uri())
            page.wait_for_function(f"document.getElementById('{PARETO_DIV}') && document.getElementById('{PARETO_DIV}').data"
                                   f" && document.getElementById('predicted-vs-measured').data")
            traces = page.evaluate(f"""document.getElementById('{PARETO_DIV}').data.map(
                t => ({{name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])}}))""")
            shapes = page.evaluate("""id => (document.getElementById(id).layout.shapes || []).map(
                s => ({type: s.type, x0: s.x0, x1: s.x1, y0: s.y0, y1: s.y1}))""", PARETO_DIV)
            wb_shapes = page.evaluate("""id => (document.getElementById(id).layout.shapes || []).map(
                s => ({type: s.type, x0: s.x0, x1: s.x1}))""", "budget-weight_bytes")
            drawn = page.locator(f"#{PARETO_DIV} .scatterlayer .trace").nth(
                [t["name"] for t in traces].index(PARETO_TRACE)).locator("path.point")
            n_drawn = drawn.count()
            box = drawn.first.bounding_box()  # plotly's drag layer takes the events: move the mouse there
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_selector(f"#{PARETO_DIV} .hoverlayer .hovertext", timeout=5000)
            hover = page.locator(f"#{PARETO_DIV} .hoverlayer .hovertext").first.text_content()
            DOCS.mkdir(exist_ok=True)  # the screenshot shows the hover label too
            page.screenshot(path=str(DOCS / "search-report.png"))
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    assert errors == []
    assert [m for m in messages if m[0] == "error"] == []
    # the Pareto plot shows exactly the Pareto set's points, in their own trace and nowhere else
    pareto = [t for t in traces if t["name"] == PARETO_TRACE]
    assert len(pareto) == 1
    assert set(zip(pareto[0]["x"], pareto[0]["y"])) == _front_points(res) and len(pareto[0]["x"]) == len(res["front"])
    assert n_drawn == len(res["front"])
    others = {pt for t in traces if t["name"] != PARETO_TRACE for pt in zip(t["x"], t["y"])}
    assert not others & _front_points(res)
    measured = {(t["metrics"]["decode_tokens_per_s"], t["metrics"]["ppl_increase"]) for t in res["trials"] if t["status"] == "measured"}
    assert others - {(50.0, 0.0)} == measured - _front_points(res)  # plus the baseline
    # hover shows the recipe and its numbers
    assert "t001" in hover and "rtn(bits=4" in hover and "decode_tokens_per_s: 81.5" in hover
    # the budget is drawn: ppl_increase <= 20% on the y axis, weight_bytes <= 0.5x (of 1e6 bytes) on the other plot's x axis
    assert any(s["type"] == "line" and s["y0"] == s["y1"] == pytest.approx(0.2) for s in shapes)
    assert any(s["type"] == "line" and s["x0"] == s["x1"] == pytest.approx(500_000) for s in wb_shapes)
    assert (DOCS / "search-report.png").stat().st_size > 10_000
    assert elapsed < 120, f"the browser check took {elapsed:.0f} s (a hang?)"


def test_leanfm_search_ends_with_the_report(tmp_path, monkeypatch, capsys):
    import leanfm.search.cli_search as cli_search
    import leanfm.search.run as run

    res = search_result()

    def fake_run(_search):  # the search itself is tested in test_search_run.py
        _write(tmp_path, res)
        return {**res, "measured_now": 4}

    monkeypatch.setattr(cli_search, "build", lambda *a, **k: None)
    monkeypatch.setattr(run, "run_search", fake_run)
    assert cli.main(["search", "--budget", "weight_bytes<=0.5x", "--out", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out
    assert PARETO_TRACE in (tmp_path / "report.html").read_text()
