"""bench's timing phase: repeats of all recipes interleaved, CPU load per repeat, ``noisy`` flags."""
from __future__ import annotations

import time

import pytest

from leanfm.bench import _noisy, _time
from leanfm.measure.cpuload import CpuLoad, contention
from leanfm.measure.protocol import Protocol
from leanfm.report.columns import cell, flag_text


class _Rec:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def repeat(self, record=True):
        self.log.append((self.name, record))


class _Entry:
    def __init__(self, name, log):
        self.timer = _Rec(name, log)


def test_repeats_are_interleaved_round_by_round():
    log = []
    _time([_Entry("A", log), _Entry("B", log), _Entry("C", log)], Protocol(repeats=2, warmup=1))
    assert [n for n, _ in log] == list("ABCABCABC")
    assert [r for _, r in log] == [False] * 3 + [True] * 6


def _run(lo, hi, others=(0.0, 0.0)):
    return {"details": {"decode_tokens_per_s_min": lo, "decode_tokens_per_s_max": hi,
                        "cpu_other_busy_cores_repeats": list(others)}}


def test_noisy_when_ranges_overlap_or_other_processes_take_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    base = _run(17.0, 18.0)
    assert _noisy(_run(29.0, 30.0), base, threads=2) is None
    assert "overlaps the baseline's 17.00-18.00" in _noisy(_run(17.5, 19.0), base, threads=2)
    busy = _noisy(_run(29.0, 30.0, others=(1.0, 0.9, 1.1)), base, threads=2)
    assert "other processes kept 1.0 of 2 cores busy" in busy
    assert "baseline: other processes" in _noisy(_run(29.0, 30.0), _run(17.0, 18.0, (1.2, 1.0, 1.0)), threads=2)
    # a run on 1 thread of 2 cores can spare a core: one busy core elsewhere is no contention
    assert contention([1.0, 1.0], threads=1) is None


def test_cpu_load_sees_this_process_work():
    with CpuLoad() as load:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            pass
    if load.self_busy_cores is None:
        pytest.skip("no /proc here")
    assert load.self_busy_cores > 0.5 and load.other_busy_cores >= 0


def test_table_marks_a_noisy_speedup():
    run = {"status": "ok", "metrics": {"speedup": 1.5},
           "flags": {"simulated": False, "kernel": "k", "noisy": True, "noisy_reason": "overlap"}}
    assert cell(run["metrics"], "speedup", lambda v: f"{v:.2f}×", run) == "1.50× noisy"
    assert flag_text(run).endswith("NOISY: overlap")
    assert "interrupted" in flag_text({"status": "timing"})


def test_bench_interleaves_and_records_load(tiny_model_dir, tiny_text, tmp_path):
    from leanfm.bench import bench

    proto = Protocol(dataset=str(tiny_text), seqlen=64, groups=("speed", "memory"), threads=1, prompt=8, gen=4,
                     repeats=3, warmup=1)
    res = bench(str(tiny_model_dir), ["baseline", "rtn-w4"], proto, tmp_path / "o")
    base, w4 = res["runs"]
    assert res["environment"]["speed_schedule"] == "interleaved"
    for run in (base, w4):
        assert run["status"] == "ok"
        assert run["details"]["speed_schedule"] == "interleaved with 1 other recipes"
        assert len(run["details"]["cpu_other_busy_cores_repeats"]) == 3
        assert isinstance(run["flags"]["noisy"], bool)
        assert run["metrics"]["peak_rss_bytes"] > 0 and run["metrics"]["kv_cache_bytes"] > 0
    assert "peak_rss_raw_bytes" in w4["details"]  # the baseline model was resident during its memory pass
    seq = bench(str(tiny_model_dir), ["baseline", "rtn-w4"], proto, tmp_path / "s", interleave=False)
    assert seq["runs"][1]["details"]["speed_schedule"] == "sequential"


def test_report_marks_noisy_and_keeps_execution_on_its_own_row():
    from leanfm.report.html import render

    run = {"status": "ok", "recipe": {"name": "rtn-w4g64"}, "metrics": {"decode_tokens_per_s": 5.27, "speedup": 1.06},
           "flags": {"simulated": False, "kernel": "k", "noisy": True, "noisy_reason": "overlap"}}
    page = render({"runs": [run], "schema_version": "1.1"})
    assert "1.06× noisy" in page and "NOISY: overlap" in page
    assert '<tr class=exec><td colspan=2>' in page  # full-width line under the metrics: the table fits the page
