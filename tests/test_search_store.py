"""The search results store: content hashes, first-writer-wins results, trials that survive kill -9."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leanfm.errors import LeanfmError
from leanfm.measure.protocol import Protocol
from leanfm.recipe import parse_recipe
from leanfm.search.store import ResultKey, Store, model_hash, protocol_hash, recipe_hash, search_id

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def key(i: int = 0, model: str = "m" * 64) -> ResultKey:
    return ResultKey(model, f"r{i}", "wikitext2", "p", "0.1.0")


# --- hashes --------------------------------------------------------------------------------

def test_recipe_hash_ignores_name_order_and_spelled_out_defaults():
    short = {"name": "a", "seed": 0, "steps": [{"method": "rtn", "bits": 4}]}
    recipe = parse_recipe("name: b\ndescription: other\nsteps:\n  - {group_size: null, bits: 4, method: rtn}\n")
    full = {"name": "c", "seed": 0, "steps": [recipe.steps[0].to_dict()]}
    assert len(full["steps"][0]) > 2  # really spelled out
    assert recipe_hash(short) == recipe_hash(recipe) == recipe_hash(full)
    assert recipe_hash({"steps": [{"method": "rtn", "bits": 4.0}]}) == recipe_hash(short)  # seed 0 default, 4.0 == 4
    assert recipe_hash({**short, "seed": 1}) != recipe_hash(short)
    assert recipe_hash({"steps": [{"method": "rtn", "bits": 8}]}) != recipe_hash(short)
    two = [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4}]
    assert recipe_hash({"steps": two}) != recipe_hash({"steps": two[::-1]})  # step order is part of the recipe


def test_recipe_hash_of_unknown_method_uses_the_step_as_given():
    assert recipe_hash({"steps": [{"method": "zzz", "a": 1, "b": [1, 2]}]}) == \
        recipe_hash({"steps": [{"b": (1, 2), "a": 1, "method": "zzz"}]})
    assert recipe_hash({"steps": [{"method": "zzz", "a": 1}]}) != recipe_hash({"steps": [{"method": "zzz", "a": 2}]})


def test_protocol_hash_fills_defaults_and_ignores_data_dir():
    default = Protocol().to_dict()
    assert protocol_hash({}) == protocol_hash(default) == protocol_hash(Protocol(data_dir="/elsewhere"))
    assert protocol_hash({"groups": ["speed", "quality"]}) == protocol_hash({"groups": ["quality", "speed"]})
    assert protocol_hash({"seqlen": 512}) != protocol_hash({})
    assert protocol_hash({"runtime": "llama.cpp"}) != protocol_hash({})  # extra keys count
    k = ResultKey.of("m", {"steps": []}, {"dataset": "c4"})
    assert k.dataset == "c4" and k.version and k.protocol == protocol_hash({"dataset": "c4"})


def _model_dir(root: Path) -> Path:
    d = root / "model"
    (d / ".cache").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(3 << 20))  # > one 1 MiB chunk
    (d / "config.json").write_text('{"hidden_size": 64}')
    (d / "README.md").write_text("not hashed")
    (d / ".cache" / "x.json").write_text("not hashed")
    return d


def test_model_hash_is_content_only(tmp_path):
    d = _model_dir(tmp_path)
    h = model_hash(d)
    (d / "README.md").write_text("changed")
    (d / ".cache" / "x.json").write_text("changed")
    assert model_hash(d) == h
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("model.safetensors", "config.json"):
        (copy / f).write_bytes((d / f).read_bytes())
    assert model_hash(copy) == h  # where it lies does not count
    (copy / "config.json").write_text('{"hidden_size": 65}')
    assert model_hash(copy) != h
    assert model_hash(d / "model.safetensors") != h  # a single file: its bytes
    with pytest.raises(LeanfmError, match="no such file"):
        model_hash(tmp_path / "missing")


def test_model_hash_is_cached_by_size_and_mtime(tmp_path):
    d = _model_dir(tmp_path)
    store = Store(tmp_path / "s.db")
    h = store.model_hash(d)
    f = d / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the cached digest is used
    assert store.model_hash(d) == h and model_hash(d) != h
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert store.model_hash(d) == model_hash(d) != h


# --- results -------------------------------------------------------------------------------

def test_put_get_first_writer_wins(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store.get(key()) is None and store.count_measured(key()) == 0
    assert store.put(key(), {"metrics": {"perplexity": 10.5}}) is True
    assert store.put(key(), {"metrics": {"perplexity": 99.0}}) is False
    assert Store(tmp_path / "s.db").get(key()) == {"metrics": {"perplexity": 10.5}}
    assert store.count_measured(key()) == 2  # the log shows the wasted second measurement
    assert store.get(key(1)) is None
    clone = pickle.loads(pickle.dumps(store))  # a Ray worker receives it pickled
    assert clone.get(key()) == {"metrics": {"perplexity": 10.5}}


def test_not_a_database_is_one_line_error(tmp_path):
    bad = tmp_path / "s.db"
    bad.write_text("hello, not sqlite" * 100)
    with pytest.raises(LeanfmError, match="cannot use results store"):
        Store(bad)


def _writer(path: str, name: str, shared: int, own: int) -> None:
    store = Store(path)
    for i in range(shared):
        store.put(key(i), {"writer": name}, worker=name)
    for i in range(own):
        store.put(key(i, model=name), {"writer": name}, worker=name)


def test_two_processes_writing_concurrently_lose_no_row(tmp_path):
    db = str(tmp_path / "s.db")
    Store(db).close()
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_writer, args=(db, name, 150, 50)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 150 + 2 * 50
    assert con.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 2 * (150 + 50)
    for i in range(150):
        log = [m for m in con.execute("SELECT worker, inserted FROM measurements WHERE recipe = ? AND model = ?",
                                      (f"r{i}", "m" * 64))]
        assert sorted(w for w, _ in log) == ["a", "b"]
        winners = [w for w, ins in log if ins]
        assert len(winners) == 1 and store.get(key(i)) == {"writer": winners[0]}
    for name in ("a", "b"):
        assert all(store.get(key(i, model=name)) == {"writer": name} for i in range(50))


# --- trials --------------------------------------------------------------------------------

SID = search_id("m" * 64, {"bits": [4, 8]}, {"max_trials": 12}, ["perplexity", "weight_bytes"], 0)


def test_search_id_names_the_search():
    assert SID == search_id("m" * 64, {"bits": [4, 8]}, {"max_trials": 12}, ["perplexity", "weight_bytes"], 0)
    assert SID != search_id("m" * 64, {"bits": [4, 8]}, {"max_trials": 12}, ["perplexity", "weight_bytes"], 1)


def test_trial_states(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store.claim(SID, 0, {"bits": 4}, "r0", "w1")
    assert store.claim(SID, 0, {"bits": 4}, "r0", "w1")  # re-entrant for the same worker
    assert not store.claim(SID, 0, {"bits": 4}, "r0", "w2")  # held by a live worker
    with pytest.raises(LeanfmError, match="does not repeat its trials"):
        store.claim(SID, 0, {"bits": 8}, "r1", "w1")
    assert store.finish(SID, 0, result={"perplexity": 11.0}, key=key(0), run={"ok": 1}, worker="w1")
    assert not store.finish(SID, 0)  # already done
    assert not store.claim(SID, 0, {"bits": 4}, "r0", "w1")
    assert store.claim(SID, 1, {"bits": 8}, "r1", "w1") and store.reject(SID, 1, "over the 1 GB budget")
    assert store.claim(SID, 2, {"bits": 3}, "r2", "w1") and store.fail(SID, 2, "gptq: no calibration data")
    assert not store.claim(SID, 1, {"bits": 8}, "r1", "w1") and not store.claim(SID, 2, {"bits": 3}, "r2", "w1")
    assert not store.reject(SID, 7, "never claimed")
    t = {r["trial"]: r for r in store.trials(SID)}
    assert [t[i]["state"] for i in range(3)] == ["done", "rejected", "failed"]
    assert t[0]["result"] == {"perplexity": 11.0} and t[0]["params"] == {"bits": 4}
    assert t[1]["reason"] == "over the 1 GB budget" and t[2]["reason"] == "gptq: no calibration data"
    assert store.get(key(0)) == {"ok": 1} and store.count_measured(key(0)) == 1
    assert [m["trial"] for m in store.measurements(SID)] == [0]


CLAIM_AND_WAIT = """
import sys
from leanfm.search.store import Store
store = Store(sys.argv[1])
print(store.claim(sys.argv[2], 0, {"bits": 4}, "r0", "child"), flush=True)
sys.stdin.readline()
"""


def test_claim_of_a_dead_worker_is_taken_over(tmp_path):
    db = str(tmp_path / "s.db")
    child = subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, db, SID], env=ENV, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == "True"
    store = Store(db)
    assert not store.claim(SID, 0, {"bits": 4}, "r0", "parent")  # its worker lives
    child.kill()
    child.wait()
    assert store.claim(SID, 0, {"bits": 4}, "r0", "parent")
    row = store.trials(SID)[0]
    assert row["attempts"] == 2 and row["worker"] == "parent" and row["pid"] == os.getpid()


def test_claim_on_another_host_expires_with_its_lease(tmp_path):
    db = tmp_path / "s.db"
    store = Store(db, lease_s=600)
    assert store.claim(SID, 0, {"bits": 4}, "r0", "w1")
    con = sqlite3.connect(db)
    con.execute("UPDATE trials SET host = 'elsewhere', heartbeat = ?", (time.time() - 60,))
    con.commit()
    assert not store.claim(SID, 0, {"bits": 4}, "r0", "w2")  # fresh heartbeat: still held
    con.execute("UPDATE trials SET heartbeat = ?", (time.time() - 700,))
    con.commit()
    assert store.claim(SID, 0, {"bits": 4}, "r0", "w2")
    assert store.heartbeat(SID, 0)


# --- a search loop killed with SIGKILL, then run again -------------------------------------

LOOP = """
import os, sys, time
from pathlib import Path
from leanfm.search.store import ResultKey, Store, recipe_hash
db, sid, n, sleep, mark, slow_at, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), \\
    sys.argv[5], int(sys.argv[6]), sys.argv[7]
while go != "-" and not Path(go).exists():
    time.sleep(0.01)
store = Store(db)
worker = f"w{os.getpid()}"
for i in range(n):
    recipe = {"seed": 0, "steps": [{"method": "toy", "k": i}]}
    rh = recipe_hash(recipe)
    if not store.claim(sid, i, {"k": i}, rh, worker):
        continue
    key = ResultKey("m" * 64, rh, "wikitext2", "p", "0.1.0")
    if store.get(key) is not None:  # measured before: cached
        store.finish(sid, i, result={"cached": True})
        continue
    if i == slow_at:
        Path(mark).write_text(str(i))
        time.sleep(60)
    time.sleep(sleep)  # "measure"
    run = {"recipe": recipe, "metrics": {"perplexity": 10.0 + i}, "worker": worker}
    store.finish(sid, i, result={"perplexity": 10.0 + i}, key=key, run=run, worker=worker)
"""
N = 12


def _loop(tmp_path, db, n=N, sleep=0.02, slow_at=-1, go="-"):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(LOOP))
    mark = tmp_path / "mark"
    return subprocess.Popen([sys.executable, str(script), str(db), SID, str(n), str(sleep), str(mark), str(slow_at),
                             str(go)], env=ENV), mark


def _check_each_measured_once(db, n=N):
    store = Store(db)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    trials = store.trials(SID)
    assert [t["trial"] for t in trials] == list(range(n)) and {t["state"] for t in trials} == {"done"}
    log = store.measurements(SID)
    assert sorted(m["trial"] for m in log) == list(range(n))  # each trial measured exactly once
    assert all(m["inserted"] == 1 for m in log)
    for t in trials:
        run = store.get(ResultKey("m" * 64, t["recipe"], "wikitext2", "p", "0.1.0"))
        assert run["metrics"]["perplexity"] == 10.0 + t["trial"] == t["result"]["perplexity"]
    return trials, log


def test_kill_9_mid_measurement_then_resume(tmp_path):
    db = tmp_path / "s.db"
    child, mark = _loop(tmp_path, db, slow_at=5)
    deadline = time.time() + 60
    while not mark.exists():
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    states = {t["trial"]: t["state"] for t in Store(db).trials(SID)}
    assert states == {**{i: "done" for i in range(5)}, 5: "claimed"}  # trial 5 was being measured
    child, _ = _loop(tmp_path, db)
    assert child.wait(60) == 0
    trials, log = _check_each_measured_once(db)
    assert trials[5]["attempts"] == 2 and all(t["attempts"] == 1 for t in trials if t["trial"] != 5)
    assert {m["worker"] for m in log if m["trial"] < 5} != {m["worker"] for m in log if m["trial"] >= 5}


def test_kill_9_at_random_points_then_resume(tmp_path):
    db = tmp_path / "s.db"
    rng = random.Random(0)
    for _ in range(3):
        child, _ = _loop(tmp_path, db, sleep=0.03)
        time.sleep(rng.uniform(0.3, 0.8))  # interpreter start included: lands anywhere in the loop
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    child, _ = _loop(tmp_path, db, sleep=0.03)
    assert child.wait(60) == 0
    _check_each_measured_once(db)


def test_two_workers_share_the_store(tmp_path):
    db = tmp_path / "s.db"
    go = tmp_path / "go"
    children = [_loop(tmp_path, db, n=20, sleep=0.05, go=go)[0] for _ in range(2)]
    time.sleep(0.5)
    go.write_text("")
    assert [c.wait(60) for c in children] == [0, 0]
    trials, log = _check_each_measured_once(db, n=20)
    assert {m["worker"] for m in log} == {f"w{c.pid}" for c in children}  # both measured, none twice
