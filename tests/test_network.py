"""Network cost of distributed fine-tuning: bytes counted at the collective equal the count from
the trainable parameters' shapes (data parallel on gloo, 2 processes; federated rounds)."""
from __future__ import annotations

import pytest

from leanfm.errors import LeanfmError
from leanfm.training.ddp import analytic_bytes, run_ddp

from .conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("net")
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "model"))
    (d / "train.txt").write_text(SAMPLE_TEXT * 4)
    return d


def test_analytic_counts_by_hand():
    # full: every element once; PowerSGD rank 2: a 64x128 matrix as (64 + 128) x 2, a 64-vector and
    # a 4x4 matrix (not worth compressing: (4 + 4) x 2 x 2 > 16) raw
    shapes = [(64, 128), (64,), (4, 4)]
    assert analytic_bytes(shapes, "full") == (64 * 128 + 64 + 16) * 4
    assert analytic_bytes(shapes, "powersgd", rank=2) == ((64 + 128) * 2 + 64 + 16) * 4


@pytest.mark.parametrize("mode", ["full", "lora", "powersgd"])
def test_data_parallel_bytes_equal_the_analytic_count(tiny, mode):
    r = run_ddp(str(tiny / "model"), mode, steps=3, batch=2, seqlen=16, data=str(tiny / "train.txt"), lora_rank=4,
                psgd_rank=2, psgd_start=2)
    assert r["network_bytes_per_step"] == pytest.approx(r["analytic_bytes_per_step"], rel=0.05)
    n = r["trainable_params"]
    if mode == "lora":
        assert n == 8192 and r["network_bytes_per_step"] == n * 4 * 2
    if mode == "powersgd":  # vanilla all-reduce before start_powerSGD_iter, compressed after
        assert r["network_bytes_per_step_each"][0] == n * 4 * 2 > 3 * r["network_bytes_per_step"]
    assert all(len(l) == 3 for l in r["loss"])


def test_powersgd_with_many_buckets_keeps_the_workers_in_step(tiny):
    # buckets of ~4 KB: many in flight per step, as SmolLM2's 538 MB of gradients in 25 MB buckets;
    # gloo aborts on mismatched collectives unless each bucket's P/Q chain completes in turn
    r = run_ddp(str(tiny / "model"), "powersgd", steps=3, batch=2, seqlen=16, data=str(tiny / "train.txt"),
                psgd_rank=2, psgd_start=2, bucket_mb=0.004, timeout_s=300)
    assert r["network_bytes_per_step"] == pytest.approx(r["analytic_bytes_per_step"], rel=0.05)


def test_data_parallel_bad_mode_is_one_line():
    with pytest.raises(LeanfmError, match="not one of full, lora, powersgd"):
        run_ddp("x", "allgather")


# --- federated (Flower simulation) --------------------------------------------------------------

def test_int8_groups_round_trip_within_half_a_step():
    import numpy as np

    from leanfm.training.federated import dequantize_groups, quantize_groups

    x = np.random.default_rng(0).normal(size=(6, 100)).astype(np.float32)  # 600 values: groups of 256, 256, 88
    codes, scale = quantize_groups(x)
    assert codes.dtype == np.int8 and codes.size == 600 and scale.shape == (3,)
    each = np.repeat(scale, 256)[:600].reshape(x.shape)
    assert np.all(np.abs(dequantize_groups(codes, scale, x.shape) - x) <= each / 2 + 1e-7)
    assert scale[2] == np.abs(x.reshape(-1)[512:]).max() / 127  # the short last group has its own scale
    z = np.zeros(4, np.float32)  # a zero group keeps a finite scale
    assert np.all(dequantize_groups(*quantize_groups(z), z.shape) == 0)


def test_payload_counts_by_hand():
    from leanfm.training.federated import payload_bytes

    shapes = [(8, 16), (16,)]
    assert payload_bytes(shapes, "lora", clients=4) == (8 * 16 + 16) * 4 * 2 * 4
    assert payload_bytes(shapes, "lora8", clients=4) == ((8 * 16 + 4) + (16 + 4)) * 2 * 4  # one scale per 256 values


def test_the_counting_grid_counts_serialized_messages(monkeypatch):
    pytest.importorskip("flwr")
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp's process has set
        monkeypatch.setattr(TaskIdentity, attr, 1)
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.common.serde import message_to_proto

    from leanfm.training.federated import CountingGrid

    class Echo:
        def send_and_receive(self, messages, timeout=None):
            return [Message(content=m.content, reply_to=m) for m in messages]

    rec = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((32, 8), np.float32))})})
    msgs = [Message(content=rec, dst_node_id=i, message_type="train") for i in (1, 2)]
    g = CountingGrid(Echo())
    replies = g.send_and_receive(msgs)
    assert g.rounds == [{"down_bytes": sum(message_to_proto(m).ByteSize() for m in msgs),
                         "up_bytes": sum(message_to_proto(m).ByteSize() for m in replies), "messages": 2, "replies": 2}]
    assert g.rounds[0]["down_bytes"] > 2 * 32 * 8 * 4  # the payload and the message around it


def test_federated_lora8_round_counts_and_averages(tiny):
    import numpy as np

    pytest.importorskip("flwr")
    from leanfm.training.federated import run_federated

    r = run_federated(str(tiny / "model"), "lora8", clients=2, rounds=1, local_steps=1, batch=1, seqlen=16,
                      data=str(tiny / "train.txt"), lora_rank=4)
    # LoRA on q_proj and v_proj (the default): rank 4 x (64 in + 64 out) and 4 x (64 in + 32 out, 2 KV heads) per layer, 2 layers
    n = 2 * 4 * ((64 + 64) + (64 + 32))
    assert r["lora_targets"] == "q_proj,v_proj" and r["trainable_params"] == n == 1792 and len(r["rounds_bytes"]) == 1
    assert all(".q_proj." in k or ".v_proj." in k for k in r["final_state"])
    payload, measured = r["payload_bytes_per_round"], r["network_bytes_per_round"]
    groups = sum(-(-int(np.prod(v.shape)) // 256) for v in r["final_state"].values())  # one fp32 scale per 256 values
    assert payload == (n + 4 * groups) * 2 * 2  # codes and scales, both directions, 2 clients
    print("framing bytes per message", (measured - payload) / (2 * 2))
    assert payload < measured < payload + 2 * 2 * 1500  # one codes and one scales array per message, its config, metrics
    assert set(r["train_metrics"][1]) >= {"train_loss"}


def test_eight_bit_record_round_trip_in_the_states_order():
    import numpy as np

    pytest.importorskip("flwr")
    from leanfm.training.federated import GROUP, _from_record, _to_record

    rng = np.random.default_rng(0)
    state = {"b.weight": rng.standard_normal((3, 300)).astype(np.float32), "a.weight": rng.standard_normal((16, 5)).astype(np.float32)}
    rec = _to_record(state, True)
    assert sorted(rec.keys()) == ["int8::codes", "int8::scales"]
    assert rec["int8::codes"].numpy().size == 980 and rec["int8::scales"].numpy().size == -(-900 // GROUP) + 1
    back = _from_record(rec, {k: v.shape for k, v in state.items()})
    assert list(back) == list(state)
    for k, v in state.items():  # each tensor's own groups: error at most half a step of its group's max / 127
        assert back[k].shape == v.shape and np.abs(back[k] - v).max() <= np.abs(v).max() / 127 / 2 + 1e-6
    with pytest.raises(LeanfmError, match="needs the state's shapes"):
        _from_record(rec)
    with pytest.raises(LeanfmError, match="holds 980 codes"):
        _from_record(rec, {"b.weight": (3, 300)})
    assert set(_from_record(_to_record(state, False))) == set(state)


def test_flower_missing_names_the_install_command(monkeypatch):
    import sys

    from leanfm.training.federated import run_federated

    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(LeanfmError, match=r"pip install 'leanfm\[federated\]'"):
        run_federated("x")


@pytest.mark.parametrize("targets", ["q_proj", (), ("q_proj,v_proj",)])
def test_federated_lora_targets_are_checked_before_any_work(targets):
    pytest.importorskip("flwr")
    from leanfm.training.federated import run_federated

    with pytest.raises(LeanfmError, match="lora_targets must be a non-empty tuple"):
        run_federated("no-such-model", "lora", lora_targets=targets)


def test_a_worker_that_dies_without_reporting_ends_the_wait_at_once():
    import queue
    import time
    from types import SimpleNamespace

    from leanfm.training.ddp import _collect

    q = queue.Queue()
    q.put({"rank": 0, "bytes_per_step": [1]})
    procs = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=-6)]  # rank 1 aborted (SIGABRT), as gloo does
    t0 = time.perf_counter()
    with pytest.raises(LeanfmError, match=r"worker 1 died \(signal 6\) before reporting"):
        _collect(q, procs, time.perf_counter() + 600)
    assert time.perf_counter() - t0 < 10
    alive = [SimpleNamespace(exitcode=None)]
    with pytest.raises(LeanfmError, match="did not report within the timeout"):
        _collect(queue.Queue(), alive, time.perf_counter() + 1.5)
