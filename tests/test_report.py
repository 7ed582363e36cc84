"""results.json validation, and what the terminal table and report.html say about energy and fidelity."""
from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from leanfm import results as res
from leanfm.errors import LeanfmError
from leanfm.report.columns import COLUMNS, MISSING, cell, fidelity_measured, footnotes, present_columns
from leanfm.report.html import render, write_report
from leanfm.report.table import print_table


def _run(name, steps=(), status="ok", **metrics):
    return {"recipe": {"name": name, "steps": [dict(s) for s in steps]}, "status": status, "metrics": metrics,
            "details": {}, "flags": {"simulated": False, "kernel": "k"}}


def _results(*runs, power_w=12):
    return {"schema_version": res.SCHEMA_VERSION, "model": "m", "environment": {"threads": 2}, "protocol": {"dataset": "d"},
            "hardware_profile": {"name": "local", "power_w": power_w}, "runs": list(runs)}


def _table(results) -> str:
    buf = io.StringIO()
    print_table(results, Console(file=buf, width=250))
    return buf.getvalue()


RTN = [{"method": "rtn", "bits": 4}]


# ---------------------------------------------------------------- 5. results.read validates the structure


@pytest.mark.parametrize("content,needle", [
    ("[]", "the top level is a list, expected an object with schema_version and runs"),
    ("{}", "lacks 'schema_version'"),
    ('{"runs": 5}', "lacks 'schema_version'"),
    ('"text"', "the top level is a string"),
    ("5", "the top level is a number"),
    ("null", "the top level is null"),
    ('{"schema_version": "1.1"}', "lacks 'runs'"),
    ('{"schema_version": "1.1", "runs": 5}', "'runs' is a number, expected a list"),
    ('{"schema_version": "1.1", "runs": {"a": 1}}', "'runs' is an object, expected a list"),
    ('{"schema_version": "1.1", "runs": [5]}', "runs[0] is a number, expected an object"),
    ('{"schema_version": "1.1", "runs": [{"metrics": {}}]}', "runs[0] lacks a recipe object with a name"),
    ('{"schema_version": "1.1", "runs": [{"recipe": "rtn"}]}', "runs[0] lacks a recipe object with a name"),
    ('{"schema_version": "1.1", "runs": [{"recipe": {"name": "b"}, "metrics": []}]}', "runs[0].metrics is a list, expected an object"),
    ('{"schema_version": "1.1", "runs": [{"recipe": {"name": "b"}, "flags": 1}]}', "runs[0].flags is a number"),
    ('{"schema_version": "1.1", "runs": [], "environment": []}', "'environment' is a list, expected an object"),
    ('{"schema_version": "9.0", "runs": []}', "schema_version '9.0'"),
    ("{not json", "is not valid JSON"),
])
def test_read_refuses_a_malformed_file_in_one_line(content, needle, tmp_path):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(LeanfmError) as e:
        res.read(tmp_path)
    msg = str(e.value)
    assert needle in msg and str(tmp_path / "results.json") in msg and "\n" not in msg


@pytest.mark.parametrize("content", ["[]", "{}", '{"runs": 5}', '{"schema_version": "1.1", "runs": [{"x": 1}]}'])
def test_report_cli_on_malformed_results_is_a_one_line_error(content, tmp_path, capsys):
    from leanfm.cli import main

    (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanfm: error:") and "results.json" in err and "\n" not in err
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "report.html").exists()


def test_read_accepts_a_valid_file_and_the_report_renders(tmp_path, capsys):
    from leanfm.cli import main

    data = _results(_run("baseline", perplexity=17.0), _run("rtn-w4", RTN, perplexity=18.0))
    res.write(data, tmp_path)
    assert res.read(tmp_path) == data
    assert main(["report", str(tmp_path)]) == 0
    assert "rtn-w4" in capsys.readouterr().out and (tmp_path / "report.html").exists()
    empty = _results()
    res.write(empty, tmp_path / "empty")
    assert res.read(tmp_path / "empty")["runs"] == []
    assert main(["report", str(tmp_path / "empty")]) == 0


def test_unwritable_report_is_a_one_line_error(tmp_path, monkeypatch):
    import os

    def boom(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(LeanfmError, match="cannot write .*report.html: Permission denied") as e:
        write_report(_results(_run("baseline", perplexity=17.0)), tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 6. J/token says how it was obtained


@pytest.mark.parametrize("source,mark,meaning", [
    ("estimated", "est.", "estimated (profile power x time)"),
    ("rapl", "RAPL", "measured by the CPU package energy counters (RAPL)"),
    ("nvml", "NVML", "measured by the GPU energy counter (NVML)"),
    (None, "?", "source not recorded"),
])
def test_energy_cell_and_footnote_name_the_source(source, mark, meaning):
    metrics = {"energy_j_per_token": 0.25}
    if source is not None:
        metrics["energy_source"] = source
    data = _results(_run("baseline", **metrics))
    run = data["runs"][0]
    assert cell(run["metrics"], "energy_j_per_token", dict((k, f) for k, _, f in COLUMNS)["energy_j_per_token"], run) == f"0.250 {mark}"
    notes = footnotes(data)
    assert len(notes) == 1 and notes[0].startswith(f"J/token {mark} = {meaning}") and "[all runs]" in notes[0]
    table = _table(data)
    assert f"0.250 {mark}" in table and meaning in table
    page = render(data)
    assert meaning in page and f"0.250 {mark}" in page
    if source == "estimated":
        assert "(local: 12 W)" in notes[0] and "not metered" in notes[0]
    elif source in ("rapl", "nvml"):
        assert "estimated" not in notes[0] and "measured" in notes[0]


def test_mixed_energy_sources_name_their_runs():
    data = _results(_run("baseline", energy_j_per_token=0.3, energy_source="estimated"),
                    _run("rtn-w4", RTN, energy_j_per_token=0.2, energy_source="rapl"))
    notes = footnotes(data)
    assert any(n.startswith("J/token est. = estimated (profile power x time)") and n.endswith("[baseline]") for n in notes)
    assert any(n.startswith("J/token RAPL = measured") and n.endswith("[rtn-w4]") for n in notes)


def test_no_energy_no_footnote():
    data = _results(_run("baseline", perplexity=17.0))
    assert footnotes(data) == [] and "J/token" not in _table(data) and "J/token" not in render(data)


# ---------------------------------------------------------------- 7. unmeasured fidelity is "–"


def _fmt(key):
    return dict((k, f) for k, _, f in COLUMNS)[key]


@pytest.mark.parametrize("value", [None, float("nan"), "absent"])
@pytest.mark.parametrize("key", ["top1_agreement", "kl_to_baseline"])
def test_missing_or_nan_fidelity_is_a_dash(key, value):
    metrics = {"perplexity": 18.0} if value == "absent" else {"perplexity": 18.0, key: value}
    run = _run("rtn-w4", RTN, **metrics)
    assert cell(run["metrics"], key, _fmt(key), run) == MISSING
    data = _results(_run("baseline", perplexity=17.0), run)
    table, page = _table(data), render(data)
    assert "nan" not in table.lower() and "nan" not in page.lower()


@pytest.mark.parametrize("key", ["top1_agreement", "kl_to_baseline"])
def test_lone_baseline_by_definition_fidelity_is_not_shown(key):
    """``leanfm eval``: one run compared with nothing; its 1.0 / 0.0 'by definition' are no measurement."""
    base = _run("baseline", perplexity=17.0, top1_agreement=1.0, kl_to_baseline=0.0)
    data = _results(base)
    assert not fidelity_measured(base, key, data["runs"])
    assert cell(base["metrics"], key, _fmt(key), base, data["runs"]) == MISSING
    assert key not in [k for k, _, _ in present_columns(data["runs"])]  # a column of nothing but dashes is left out
    assert "1.0000" not in _table(data) and "0.0000" not in _table(data) and "1.0000" not in render(data)


def test_measured_fidelity_and_the_reference_baseline_are_shown():
    base = _run("baseline", perplexity=17.0, top1_agreement=1.0, kl_to_baseline=0.0)
    w4 = _run("rtn-w4", RTN, perplexity=18.0, top1_agreement=0.9123, kl_to_baseline=0.0456)
    w4["details"]["fidelity_tokens"] = 4096
    no_ref = _run("rtn-w8", RTN, perplexity=17.1)  # measured without a reference: no fidelity metrics
    data = _results(base, w4, no_ref)
    table = _table(data)
    assert "1.0000" in table and "0.0000" in table  # the baseline is the reference of rtn-w4: 1 and 0 by definition
    assert "0.9123" in table and "0.0456" in table
    row = next(line for line in table.splitlines() if "rtn-w8" in line)
    assert row.count(MISSING) >= 2
    page = render(data)
    assert "0.9123" in page and "<td>–</td>" in page


def test_report_survives_odd_values():
    run = _run("rtn-w4", RTN, perplexity="high", decode_tokens_per_s=float("inf"), speedup=None)
    run["details"] = {"decode_tokens_per_s_min": 3.0}  # a min without a max
    data = _results(_run("baseline", perplexity=17.0, decode_tokens_per_s=5.0), run)
    assert "high" in _table(data)
    page = render(data)
    assert "high" in page


def test_html_escapes_metric_text():
    run = _run("rtn-w4", RTN, perplexity="<script>x</script>")
    page = render(_results(run))
    assert "<script>x" not in page and "&lt;script&gt;" in page


def test_columns_keep_their_order_and_headers():
    data = _results(_run("baseline", perplexity=17.0, energy_j_per_token=0.1, energy_source="estimated"),
                    _run("rtn-w4", RTN, perplexity=18.0, energy_j_per_token=0.1, energy_source="estimated"))
    assert [h for _, h, _ in present_columns(data["runs"])] == ["ppl", "J/token"]
    assert math.isfinite(json.loads(json.dumps(data))["runs"][0]["metrics"]["perplexity"])
