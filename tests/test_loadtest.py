"""The load-test client (measure/loadtest.py) against a stand-in streaming server: arrivals,
latency and throughput metrics, SLOs and goodput, bounds, and one-line errors."""
import statistics

import pytest

from leanfm.errors import LeanfmError
from leanfm.measure.loadtest import LoadSpec, arrival_times, check_loopback, make_requests, parse_slo, run_load

from . import stub_openai


def test_parse_slo_reads_units_and_refuses_garbage():
    assert parse_slo("ttft:500ms,tpot:100ms") == {"ttft": 500.0, "tpot": 100.0}
    assert parse_slo("e2e:2s, itl:250us") == {"e2e": 2000.0, "itl": 0.25}
    assert parse_slo(None) == {} and parse_slo("") == {}
    for bad in ("ttft=500", "latency:1s", "ttft:fast", "ttft:0ms"):
        with pytest.raises(LeanfmError):
            parse_slo(bad)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:80"])
def test_only_loopback_endpoints_are_load_tested(url):
    with pytest.raises(LeanfmError):
        check_loopback(url)


def test_loopback_forms_are_accepted():
    assert check_loopback("http://localhost:8080/v1") == "http://localhost:8080"
    assert check_loopback("http://127.0.0.1:9") == "http://127.0.0.1:9"
    assert check_loopback("http://[::1]:9") == "http://[::1]:9"


def test_poisson_gaps_have_the_asked_mean_and_burstiness_changes_their_spread():
    def gaps(b):
        t = arrival_times(LoadSpec(rate=4.0, num_requests=4000, duration=1e9, burstiness=b, seed=1))
        return [y - x for x, y in zip(t, t[1:])]

    poisson, bursty, regular = gaps(1.0), gaps(0.25), gaps(8.0)
    for g in (poisson, bursty, regular):
        assert statistics.fmean(g) == pytest.approx(0.25, rel=0.1)
    cv = [statistics.pstdev(g) / statistics.fmean(g) for g in (poisson, bursty, regular)]
    assert cv[0] == pytest.approx(1.0, abs=0.1) and cv[1] > 1.5 and cv[2] < 0.5  # CV of gamma = 1/sqrt(shape)


def test_bounds_cap_the_request_count_and_the_arrival_window():
    assert len(arrival_times(LoadSpec(rate=1000.0, num_requests=7, duration=100))) == 7
    t = arrival_times(LoadSpec(rate=10.0, num_requests=10_000, duration=2.0, seed=3))
    assert t[-1] <= 2.0 and 5 < len(t) < 60
    assert arrival_times(LoadSpec(rate=float("inf"), num_requests=5)) == [0.0] * 5


@pytest.mark.parametrize("spec", [dict(rate=0), dict(rate=-1), dict(rate=1, num_requests=0), dict(rate=1, burstiness=0),
                                  dict(rate=1, max_concurrency=0), dict(rate=1, duration=0)])
def test_bad_specs_are_refused(spec):
    with pytest.raises(LeanfmError):
        LoadSpec(**spec).validate()


def test_requests_are_drawn_from_the_text_with_lengths_in_range():
    text = " ".join(f"word{i}" for i in range(1000))
    reqs = make_requests(text, 50, prompt_len=20, max_tokens=10, range_ratio=0.5, seed=0)
    assert len(reqs) == 50
    plens = [len(p.split()) for p, _ in reqs]
    assert min(plens) >= 10 and max(plens) <= 30 and len(set(plens)) > 3
    assert all(5 <= m <= 15 for _, m in reqs)
    assert make_requests(text, 3, 5, 4, seed=2) == make_requests(text, 3, 5, 4, seed=2)
    with pytest.raises(LeanfmError):
        make_requests("", 3, 5, 4)


def test_metrics_from_a_streaming_server():
    srv, url = stub_openai.start(ttft=0.05, itl=0.01)
    try:
        res = run_load(url, [("a b c", 8)], LoadSpec(rate=20.0, num_requests=6, seed=0), slo=parse_slo("ttft:1s,tpot:1s"))
    finally:
        srv.shutdown()
    m = res["metrics"]
    assert m["completed"] == 6 and m["failed"] == 0
    assert 40 <= m["ttft_ms_p50"] <= 400
    assert 8 <= m["tpot_ms_p50"] <= 100 and 8 <= m["itl_ms_p50"] <= 100
    assert m["e2e_ms_p99"] >= m["e2e_ms_p50"] >= m["ttft_ms_p50"]
    assert m["output_token_throughput"] == pytest.approx(m["request_throughput"] * 8, rel=1e-6)
    assert m["mean_output_tokens"] == 8 and {r["max_tokens"] for r in res["details"]["requests"]} == {8}
    assert m["goodput"] == pytest.approx(m["request_throughput"]) and m["slo_attainment"] == 1.0
    # an SLO no request meets: no goodput
    srv, url = stub_openai.start(ttft=0.05, itl=0.01)
    try:
        res = run_load(url, [("a", 4)], LoadSpec(rate=50.0, num_requests=3), slo=parse_slo("ttft:1ms"))
    finally:
        srv.shutdown()
    assert res["metrics"]["goodput"] == 0 and res["metrics"]["slo_attainment"] == 0


def test_a_serial_server_queues_requests_and_ttft_grows():
    """One request at a time: at a rate above its capacity the queue shows up in TTFT."""
    srv, url = stub_openai.start(ttft=0.02, itl=0.01, serial=True)
    try:
        res = run_load(url, [("a", 10)], LoadSpec(rate=float("inf"), num_requests=5))
    finally:
        srv.shutdown()
    m = res["metrics"]
    assert m["completed"] == 5 and m["ttft_ms_p99"] > 1.5 * m["ttft_ms_p50"] and m["ttft_ms_p99"] > 350


def test_an_unreachable_endpoint_fails_every_request_without_raising():
    res = run_load(f"http://127.0.0.1:{stub_openai.free_port()}", [("a", 2)], LoadSpec(rate=100.0, num_requests=2, drain=5))
    assert res["metrics"]["completed"] == 0 and res["metrics"]["failed"] == 2
    assert res["details"]["errors"] and "Connect" in res["details"]["errors"][0]


def test_requests_still_running_after_the_drain_are_cancelled():
    srv, url = stub_openai.start(ttft=0.01, itl=0.2)
    try:
        res = run_load(url, [("a", 50)], LoadSpec(rate=100.0, num_requests=2, drain=0.3))
    finally:
        srv.shutdown()
    assert res["metrics"]["failed"] == 2 and any("cancelled" in e for e in res["details"]["errors"])


def test_cli_sweeps_rates_into_results_json(tmp_path, tiny_text, capsys):
    import json

    from .test_runtimes import run_cli

    srv, url = stub_openai.start(ttft=0.01, itl=0.002)
    try:
        code, out, err = run_cli(["loadtest", url, "--rate", "5,50", "--num-requests", "4", "--max-tokens", "4", "--prompt-len", "8",
                                  "--dataset", str(tiny_text), "--slo", "ttft:2s,tpot:1s", "--out", str(tmp_path / "lt")], capsys)
    finally:
        srv.shutdown()
    assert code == 0, err
    res = json.loads((tmp_path / "lt" / "results.json").read_text())
    assert res["kind"] == "loadtest" and [r["rate"] for r in res["runs"]] == [5.0, 50.0]
    for r in res["runs"]:
        m = r["metrics"]
        assert m["completed"] == 4 and m["goodput"] > 0 and m["ttft_ms_p99"] is not None
        assert len(r["details"]["requests"]) == 4
    page = (tmp_path / "lt" / "report.html").read_text()
    assert "data:image/png;base64," in page and "Capacity" in page
    # leanfm report rebuilds it from results.json and prints the table with the capacity
    (tmp_path / "lt" / "report.html").unlink()
    code, out, err = run_cli(["report", str(tmp_path / "lt")], capsys)
    assert code == 0, err
    assert (tmp_path / "lt" / "report.html").is_file() and "capacity of endpoint: 50 req/s" in out


def _lt_run(name, rate, attainment, ttft=100.0):
    return {"recipe": {"name": name}, "status": "ok", "rate": rate,
            "metrics": {"arrival_rate": rate, "requests": 10, "completed": 10, "ttft_ms_p50": ttft, "ttft_ms_p99": 2 * ttft,
                        "tpot_ms_p50": 20.0, "tpot_ms_p99": 30.0, "request_throughput": min(rate, 1.0),
                        "output_token_throughput": 32 * min(rate, 1.0), "goodput": attainment * min(rate, 1.0),
                        "slo_attainment": attainment}}


def test_capacity_is_the_highest_rate_that_met_the_attainment():
    from leanfm.report.serving import by_setup, capacity, render, rows

    res = {"kind": "loadtest", "protocol": {"slo_ms": {"ttft": 2000.0}},
           "runs": [_lt_run("cb", 1.0, 0.95), _lt_run("cb", 0.5, 1.0), _lt_run("cb", 2.0, 0.5), _lt_run("cb", float("inf"), 0.0),
                    _lt_run("serial", 0.5, 0.8), _lt_run("serial", 0.25, 0.9)]}
    setups = by_setup(res)
    assert [r["rate"] for r in setups["cb"]] == [0.5, 1.0, 2.0, float("inf")]  # sorted, inf last
    assert capacity(setups["cb"]) == 1.0 and capacity(setups["serial"]) == 0.25
    assert capacity(setups["serial"], attainment=0.95) == 0.0  # none met it: nothing sustained
    no_slo = [{"metrics": {"arrival_rate": 1.0}}]
    assert capacity(no_slo) is None
    table = rows(res)
    assert table[3][:3] == ["cb", "inf", "10/10"] and table[0][3] == "100 / 200"
    page = render(res)
    assert "<b>cb</b>: 1 req/s" in page and "<b>serial</b>: 0.25 req/s" in page and "data:image/png;base64," in page


@pytest.mark.parametrize("args,needle", [
    (["--rate", "0"], "--rate must be positive"),
    (["--rate", "-2"], "--rate must be positive"),
    (["--rate", "fast"], "--rate takes requests per second"),
    (["--slo", "ttft=5"], "cannot parse the SLO"),
    (["--burstiness", "0"], "--burstiness must be positive"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, needle):
    from .test_runtimes import run_cli

    srv, url = stub_openai.start()
    try:
        code, _, err = run_cli(["loadtest", url, *args, "--out", str(tmp_path / "x")], capsys)
    finally:
        srv.shutdown()
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_unreachable_and_remote_endpoints_are_one_line(tmp_path, capsys):
    from .test_runtimes import run_cli

    code, _, err = run_cli(["loadtest", f"http://127.0.0.1:{stub_openai.free_port()}", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "cannot reach an OpenAI-compatible server" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["loadtest", "http://192.0.2.1:8000", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "not a loopback address" in err, err
