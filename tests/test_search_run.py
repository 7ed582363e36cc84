"""``leanfm search`` end to end on a tiny model: screening, two-stage measurement, the Pareto
set, resuming from the store, and one-line refusals."""
from __future__ import annotations

import json

import pytest

from leanfm import cli
from leanfm.recipe import load_recipe
from leanfm.search.budget import parse_budget
from leanfm.search.screen import predicted_metrics, screen

pytest.importorskip("optuna")

FAST = ["--seqlen", "64", "--max-eval-tokens", "256", "--prompt", "16", "--gen", "4", "--repeats", "2", "--warmup", "0",
        "--threads", "1"]


def _search(tiny_model_dir, tiny_text, out, store, *extra):
    return cli.main(["search", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--calib-dataset", str(tiny_text),
                     "--out", str(out), "--store", str(store), *FAST, *extra])


def test_screen_rejects_by_prediction_with_slack():
    base = {"weight_bytes": 1000.0, "decode_tokens_per_s": 10.0}
    budget = parse_budget("weight_bytes<=0.3x,decode_tokens_per_s>=12")
    assert screen(budget, {"weight_bytes": 305.0, "decode_tokens_per_s": 12.0}, base, {}) is None  # within 2% slack
    why = screen(budget, {"weight_bytes": 320.0, "decode_tokens_per_s": 12.0}, base, {})
    assert why and "weight_bytes" in why and "0.32x" in why
    assert screen(budget, {"weight_bytes": 200.0, "decode_tokens_per_s": 9.5}, base, {}) is None  # speed: 25% slack
    assert "decode_tokens_per_s" in screen(budget, {"weight_bytes": 200.0, "decode_tokens_per_s": 8.0}, base, {})
    assert screen(parse_budget("ppl_increase<=10%"), {"weight_bytes": 1.0}, base, {}) is None  # quality: not predicted
    p = predicted_metrics({"weight_bytes": 250, "decode_tokens_per_s": 20, "tpot_ms": 50}, base)
    assert p["compression_ratio"] == 4 and p["speedup"] == 2 and p["tpot_ms_p50"] == 50


def test_search_finds_a_feasible_front_and_resumes_from_the_store(tiny_model_dir, tiny_text, tmp_path, capsys):
    out, store = tmp_path / "s", tmp_path / "store.sqlite"
    args = ["--methods", "rtn,magnitude", "--budget", "weight_bytes<=0.8x,ppl_increase<=300%", "--trials", "4",
            "--population", "2", "--require", "int-weights"]
    assert _search(tiny_model_dir, tiny_text, out, store, *args) == 0
    res = json.loads((out / "search.json").read_text())
    assert len(res["trials"]) == 4 and sum(res["counts"].values()) == 4
    measured = [t for t in res["trials"] if t["status"] == "measured"]
    for t in res["trials"]:
        if t["status"] == "rejected":  # by the predictor: never measured
            assert "predicted" in t["reason"] and t["metrics"] == {}
    front = [t for t in res["trials"] if t["trial"] in res["front"]]
    assert front and all(t["feasible"] for t in front)
    for t in measured:  # speed's min..max over the repeats, kept for ties within the noise on the front
        lo, hi = t["spread"]["decode_tokens_per_s"]
        assert lo <= t["metrics"]["decode_tokens_per_s"] <= hi and "ppl_increase" not in t["spread"]
    for t in front:  # every member meets the budget it was searched under, and its recipe is saved
        assert t["metrics"]["ppl_increase"] <= 3.0 and t["metrics"]["weight_bytes"] <= 0.8 * res["baseline"]["weight_bytes"]
        assert (out / "front" / f"search-t{t['trial']:03d}.yaml").is_file()
    # a candidate drawn twice (NSGA-II may breed a warm-start recipe again) is measured once, then reused
    ran = [t for t in res["trials"] if t["status"] in ("measured", "stopped")]
    assert res["measured_now"] + res["cached"] == len(ran) and res["measured_now"] == len({json.dumps(t["recipe"]["steps"]) for t in ran})
    # warm start: the first trials (at most half) reproduce built-in recipes the predictor let through
    seeded = [t for t in res["trials"] if t["builtin"]]
    assert 1 <= len(seeded) <= 2 and [t["trial"] for t in seeded] == list(range(len(seeded)))
    for t in seeded:
        assert [st["method"] for st in t["recipe"]["steps"]] == [st.method for st in load_recipe(t["builtin"]).steps]
    first = {t["trial"]: (t["params"], t["status"], t["metrics"]) for t in res["trials"]}
    capsys.readouterr()

    assert _search(tiny_model_dir, tiny_text, out, store, *args) == 0  # again: every trial comes from the store
    again = json.loads((out / "search.json").read_text())
    assert again["measured_now"] == 0 and again["front"] == res["front"]
    assert {t["trial"]: (t["params"], t["status"], t["metrics"]) for t in again["trials"]} == first
    assert [t["spread"] for t in again["trials"]] == [t["spread"] for t in res["trials"]]
    assert "Pareto set" in capsys.readouterr().out


@pytest.mark.parametrize("extra,needle", [
    (["--budget", "weight_bytes<=8OMB"], "column"),
    (["--budget", "weight_bytez<=80MB"], "did you mean weight_bytes"),
    (["--objective", "ppl_increase:up"], "unknown direction 'up'"),
    (["--budget", "weight_bytes<=0.01x", "--methods", "rtn"], "no candidate of this search space can meet --budget"),
    (["--objective", "decode_tokens_per_s:max", "--metrics", "quality"], "add speed to --metrics"),
    (["--methods", "rtn,foo"], "unknown method 'foo'"),
])
def test_bad_search_input_is_one_line_exit_2(tiny_model_dir, tiny_text, tmp_path, capsys, extra, needle):
    code = _search(tiny_model_dir, tiny_text, tmp_path / "s", tmp_path / "st.sqlite", "--trials", "2", *extra)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_ray_executor_gives_the_same_trials_and_front(tiny_model_dir, tiny_text, tmp_path, capsys):
    """Same seed, two Ray workers x 1 thread: the same candidates as in-process, and (on metrics that do
    not depend on timing) the same Pareto set."""
    pytest.importorskip("ray")
    args = ["--methods", "rtn,magnitude", "--objective", "ppl_increase:min,weight_bytes:min", "--metrics", "quality,memory",
            "--trials", "4", "--population", "2", "--require", "int-weights"]
    assert _search(tiny_model_dir, tiny_text, tmp_path / "a", tmp_path / "a.sqlite", *args) == 0
    assert _search(tiny_model_dir, tiny_text, tmp_path / "b", tmp_path / "b.sqlite", *args, "--executor", "ray", "--workers", "2") == 0
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("a", "b"))
    assert [t["params"] for t in a["trials"]] == [t["params"] for t in b["trials"]]
    assert a["front"] == b["front"] and b["executor"] == "ray" and b["measured_now"] == a["measured_now"] > 0
    for ta, tb in zip(a["trials"], b["trials"]):
        assert ta["status"] == tb["status"]
        if ta["status"] == "measured":
            assert tb["metrics"]["ppl_increase"] == pytest.approx(ta["metrics"]["ppl_increase"], rel=1e-4)


def test_ray_missing_or_unreachable_is_one_line(tiny_model_dir, tiny_text, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    code = _search(tiny_model_dir, tiny_text, tmp_path / "s", tmp_path / "st.sqlite", "--methods", "rtn", "--trials", "2",
                   "--executor", "ray")
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'leanfm[ray]'" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(builtins, "__import__", real)
    pytest.importorskip("ray")
    code = _search(tiny_model_dir, tiny_text, tmp_path / "s2", tmp_path / "st2.sqlite", "--methods", "rtn", "--trials", "2",
                   "--executor", "ray", "--address", "127.0.0.1:1")
    err = capsys.readouterr().err
    assert code == 2 and "cannot connect to the Ray cluster at --address 127.0.0.1:1" in err and len(err.strip().splitlines()) == 1, err


def test_kill_9_mid_search_then_rerun_measures_every_trial_once(tiny_model_dir, tiny_text, tmp_path):
    """The acceptance's interruption: SIGKILL once a trial is finished, the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    from leanfm.search.store import Store

    out, store_path = tmp_path / "s", tmp_path / "store.sqlite"
    cmd = [sys.executable, "-m", "leanfm.cli", "search", "--model", str(tiny_model_dir), "--dataset", str(tiny_text),
           "--calib-dataset", str(tiny_text), "--out", str(out), "--store", str(store_path), *FAST,
           "--methods", "rtn,magnitude", "--trials", "4", "--population", "2", "--require", "int-weights",
           "--budget", "ppl_increase<=300%"]
    env = {**os.environ, "LEANFM_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if store_path.exists():
            with Store(store_path) as st:
                rows = st._rows("SELECT state FROM trials", ())
            done = sum(r["state"] == "done" for r in rows)
            if done >= 1:
                break
    assert proc.poll() is None, "the search ended before it could be killed; give it more trials"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 1 and not (out / "search.json").exists()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    res = json.loads((out / "search.json").read_text())
    assert len(res["trials"]) == 4
    with Store(store_path) as st:
        log = st.measurements(res["search_id"])
        trials = st.trials(res["search_id"])
    assert all(t["state"] in ("done", "rejected", "failed") for t in trials) and len(trials) == 4
    per_key = Counter((m["recipe"], m["protocol"]) for m in log)
    assert per_key and max(per_key.values()) == 1, per_key  # no measurement made twice
    assert res["cached"] >= 1  # what the killed run finished was reused


def test_rejected_and_stopped_trials_teach_the_sampler_their_violation():
    """NSGA-II is told a rejected or stopped trial as infeasible by what is known of it (not ignored)."""
    from types import SimpleNamespace

    from leanfm.search.budget import parse_budget, parse_objectives
    from leanfm.search.run import Trial, _sampler_view

    s = SimpleNamespace(budget=parse_budget("weight_bytes<=0.3x,ppl_increase<=25%"),
                        objectives=parse_objectives("decode_tokens_per_s:max,ppl_increase:min"))
    base_pred, base = {"weight_bytes": 1000.0, "decode_tokens_per_s": 10.0}, {"weight_bytes": 900.0, "decode_tokens_per_s": 8.0,
                                                                               "ppl_increase": 0.0}
    rej = Trial(0, {}, status="rejected", predicted={"weight_bytes": 450.0, "decode_tokens_per_s": 12.0})
    values, viol = _sampler_view(rej, s, base_pred, base)
    assert values == [12.0, 0.0] and viol[0] == pytest.approx(0.5) and viol[1] == 0.0  # 0.45x against 0.3x of the predicted baseline
    stopped = Trial(1, {}, status="stopped", metrics={"ppl_increase": 0.5, "weight_bytes": 200.0}, predicted={"decode_tokens_per_s": 9.0})
    values, viol = _sampler_view(stopped, s, base_pred, base)
    assert values == [9.0, 0.5] and viol[0] == 0.0 and viol[1] == pytest.approx(1.0)  # measured short pass: 50% against 25%
    failed = Trial(2, {}, status="failed")
    assert _sampler_view(failed, s, base_pred, base) is None


def test_invalid_draws_are_refused_by_the_predictor_and_not_counted(tiny_model_dir, tiny_text, tmp_path):
    """A rank-145 factor cannot hold int4 codes two per byte: the predictor says so in
    milliseconds, the draw is recorded as invalid and another is drawn in its place."""
    space = tmp_path / "space.yaml"
    space.write_text("methods:\n  svd: {param_ratio: [0.505]}\n  rtn: {bits: [4, 8], group_size: [null]}\n"
                     "require: [low-rank, int-weights]\n")
    out = tmp_path / "s"
    assert _search(tiny_model_dir, tiny_text, out, tmp_path / "st.sqlite", "--space", str(space), "--trials", "3",
                   "--population", "3", "--metrics", "quality,memory", "--objective", "ppl_increase:min,weight_bytes:min") == 0
    res = json.loads((out / "search.json").read_text())
    invalid = [t for t in res["trials"] if t["status"] == "invalid"]
    counted = [t for t in res["trials"] if t["status"] != "invalid"]
    assert len(counted) == 3 and invalid  # seed 0 draws 4-bit at least once
    assert all("odd in_features 145" in t["reason"] and t["metrics"] == {} for t in invalid)
    assert all(t["recipe"]["steps"][1]["bits"] == 8 for t in counted)
