"""Federated fine-tuning with Flower's simulation (on Ray) and the bytes of every round counted.

Each of ``clients`` virtual nodes holds one shard of the training windows; every round the server
sends the global trainable state, each client trains ``local_steps`` steps on its shard and sends
its state back, and FedAvg (McMahan et al., 2017) averages the states weighted by the number of
windows each client trained on (Flower's own ``FedAvg``). Modes:

- ``full``: every weight travels, both ways;
- ``lora``: only the LoRA adapters travel (the frozen base is the same everywhere); by default on
  the attention's query and value projections, as in the LoRA paper (Hu et al., 2021, section 7.1),
  ``lora_targets`` chooses others (``all-linear``: every linear but the head);
- ``lora8``: the adapters travel as 8-bit integers with one fp32 absmax scale per 256 values: the server
  sends the global adapters so quantized, each client sends its update (trained minus received)
  so quantized; the server dequantizes, averages the updates and adds them to its fp32 state.

Bytes are counted on the server at the Flower ``Grid``: every message it sends and every reply it
receives is serialized exactly as Flower sends it (``message_to_proto(...).ByteSize()``), per round.
:func:`payload_bytes` is the count from the tensors' shapes alone (elements x bytes x two
directions x clients) for the check that the two agree.
"""
from __future__ import annotations

import importlib
import time

import numpy as np
import torch

from ..errors import LeanfmError

MODES = ("full", "lora", "lora8")
LORA_TARGETS = ("q_proj", "v_proj")
INSTALL = "pip install 'leanfm[federated]'"  # Flower with its Ray simulation, at the pinned version
_JOB: dict = {}  # the running job, read by the server app in this process
_BASE: dict = {}  # per process (Ray actor): the loaded model, its tokenizer and its training windows


def require_flower():
    try:
        return importlib.import_module("flwr")
    except ImportError:
        raise LeanfmError(f"federated fine-tuning needs Flower with its Ray simulation, which is not installed; install it "
                          f"with: {INSTALL}") from None


# --- 8-bit rows (pure) --------------------------------------------------------------------------

GROUP = 256  # values per int8 scale: 4 bytes per 256 codes (per-row scales cost 4 per 16 on LoRA's B)


def quantize_groups(x: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in groups of ``group`` consecutive values of the flattened tensor (the last
    group may be shorter): codes = round(x / s), s = max|group| / 127. Returns the flat codes
    (one byte per value) and one fp32 scale per group."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    pad = -flat.size % group
    rows = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, group)
    scale = np.abs(rows).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(-1)[: flat.size]
    return codes, scale.astype(np.float32)


def dequantize_groups(codes: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], group: int = GROUP) -> np.ndarray:
    flat = np.concatenate([codes.astype(np.float32), np.zeros(-codes.size % group, np.float32)]).reshape(-1, group)
    return (flat * scale[:, None]).reshape(-1)[: codes.size].reshape(shape)


def payload_bytes(shapes: list[tuple[int, ...]], mode: str, clients: int) -> int:
    """Tensor bytes of one round: each state once per client per direction (8-bit: one byte per
    element plus a 4-byte scale per :data:`GROUP` elements)."""
    per = 0
    for s in shapes:
        n = int(np.prod(s))
        per += n + 4 * -(-n // GROUP) if mode == "lora8" else 4 * n
    return per * 2 * clients


# --- the model side (runs in each client's process) -------------------------------------------

def prepare(model, mode: str, lora_rank: int, targets: tuple[str, ...] = LORA_TARGETS):
    """``model`` made trainable for ``mode`` (``lora8`` trains LoRA like ``lora``)."""
    from ..methods.tune.adapters import make_trainable

    return make_trainable(model, "lora" if mode == "lora8" else mode, lora_rank, targets)


def trainable_state(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _client_model(cfg: dict):
    """A fresh trainable model per call (the base weights loaded once per process)."""
    import copy

    from ..data.calib import encode
    from ..methods.tune.handler import training_text
    from ..models.load import load

    key = (cfg["model"], cfg["mode"], cfg["lora_rank"], cfg["lora_targets"])
    if key not in _BASE:
        torch.set_num_threads(1)
        model, tok = load(cfg["model"])
        ids = encode(tok, training_text(cfg["data"]))
        _BASE.clear()
        _BASE[key] = (model, ids)
    base, ids = _BASE[key]
    model = copy.deepcopy(base)
    torch.manual_seed(cfg["seed"])
    model = prepare(model, cfg["mode"], cfg["lora_rank"], tuple(cfg["lora_targets"].split(",")))
    return model, ids


def _local_train(model, ids: torch.Tensor, cfg: dict, partition: int, partitions: int, server_round: int) -> tuple[int, float]:
    from ..methods.tune.kd import next_token_loss
    from ..methods.tune.loop import training_windows

    n = cfg["local_steps"] * cfg["batch"]
    shard = ids[partition * (ids.numel() // partitions): (partition + 1) * (ids.numel() // partitions)]
    windows = training_windows(shard, n, cfg["seqlen"], cfg["seed"] * 1000 + server_round)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    model.train()
    losses = []
    for s in range(cfg["local_steps"]):
        batch = windows[s * cfg["batch"]:(s + 1) * cfg["batch"]]
        loss = next_token_loss(model(batch, use_cache=False).logits, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return n, float(np.mean(losses))


def _to_record(state: dict[str, np.ndarray], eight_bit: bool):
    """The state as Flower arrays: fp32, one array per tensor (FedAvg averages them by name); 8-bit,
    each tensor quantized in its own groups and all codes sent as one array, all scales as another
    (per-tensor arrays would add ~0.5 kB of name, shape and header each: 12% of the codes of
    rank-16 q/v adapters on smollm2-135m). The receiver cuts them apart in the state's order."""
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    if not eight_bit:
        for k, v in state.items():
            rec[k] = Array(np.ascontiguousarray(v, dtype=np.float32))
        return rec
    parts = [quantize_groups(v) for v in state.values()]
    rec["int8::codes"] = Array(np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int8))
    rec["int8::scales"] = Array(np.concatenate([s for _, s in parts]) if parts else np.zeros(0, np.float32))
    return rec


def _from_record(rec, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`_to_record`; an 8-bit record needs ``shapes`` (the state's names, shapes
    and order)."""
    if "int8::codes" not in rec.keys():
        return {k: rec[k].numpy() for k in rec.keys()}
    if shapes is None:
        raise LeanfmError("an 8-bit federated record needs the state's shapes to be cut apart")
    codes, scales = rec["int8::codes"].numpy(), rec["int8::scales"].numpy()
    out, c, g = {}, 0, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        groups = -(-n // GROUP)
        out[name] = dequantize_groups(codes[c : c + n], scales[g : g + groups], tuple(shape))
        c, g = c + n, g + groups
    if c != codes.size or g != scales.size:
        raise LeanfmError(f"8-bit federated record holds {codes.size} codes and {scales.size} scales, the state needs {c} and {g}")
    return out


def client_train(msg, context):
    """The ClientApp's train handler: load the global state, train locally, reply with the state
    (or, 8-bit, the quantized update)."""
    from flwr.app import Message, MetricRecord, RecordDict

    cfg = dict(msg.content["config"])
    model, ids = _client_model(cfg)
    names = trainable_state(model)
    shapes = {k: tuple(v.shape) for k, v in names.items()}
    received = _from_record(msg.content["arrays"], shapes)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in received.items()}, strict=False)
    part = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    n, loss = _local_train(model, ids, cfg, part, parts, int(cfg.get("server-round", 1)))
    new = {k: v.numpy() for k, v in trainable_state(model).items()}
    eight = cfg["mode"] == "lora8"
    payload = {k: new[k] - received[k] for k in new} if eight else new
    reply = RecordDict({"arrays": _to_record(payload, eight), "metrics": MetricRecord({"num-examples": n, "train_loss": loss})})
    del model
    return Message(content=reply, reply_to=msg)


# --- the server side ----------------------------------------------------------------------------

class CountingGrid:
    """Wraps Flower's Grid: counts the serialized bytes of every message sent and every reply."""

    def __init__(self, grid):
        self._grid = grid
        self.rounds: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        from flwr.common.serde import message_to_proto

        messages = list(messages)
        down = sum(message_to_proto(m).ByteSize() for m in messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        up = sum(message_to_proto(m).ByteSize() for m in replies)
        if messages:
            self.rounds.append({"down_bytes": down, "up_bytes": up, "messages": len(messages), "replies": len(replies)})
        return replies


def _strategy(job: dict, fp32_state: dict[str, np.ndarray]):
    from flwr.serverapp.strategy import FedAvg

    n = job["clients"]
    if job["mode"] != "lora8":
        return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

    class Int8FedAvg(FedAvg):
        """FedAvg of 8-bit updates: the global state stays fp32 here and travels quantized."""

        def configure_train(self, server_round, arrays, config, grid):
            return super().configure_train(server_round, _to_record(fp32_state, True), config, grid)

        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(list(replies), is_train=True)
            if not valid:
                return None, None
            shapes = {k: v.shape for k, v in fp32_state.items()}
            weights = [float(r.content["metrics"][self.weighted_by_key]) for r in valid]
            updates = [_from_record(r.content["arrays"], shapes) for r in valid]
            for k in fp32_state:  # FedAvg of the updates, added to the global state
                fp32_state[k] = fp32_state[k] + sum(w * u[k] for w, u in zip(weights, updates)) / sum(weights)
            metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
            return _to_record(fp32_state, False), metrics

    return Int8FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)


def server_main(grid, context):
    from flwr.app import ConfigRecord

    job = _JOB
    state = {k: v.numpy() for k, v in job["initial"].items()}
    counting = CountingGrid(grid)
    strategy = _strategy(job, state)
    cfg = ConfigRecord({k: job[k] for k in ("model", "mode", "lora_rank", "lora_targets", "local_steps", "batch", "seqlen", "lr", "data", "seed")})
    result = strategy.start(grid=counting, initial_arrays=_to_record(state, False), num_rounds=job["rounds"], train_config=cfg)
    job["rounds_bytes"] = counting.rounds
    final = result.arrays if job["mode"] != "lora8" else _to_record(state, False)
    job["final"] = {k: torch.from_numpy(np.array(v)) for k, v in _from_record(final).items()}
    job["train_metrics"] = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}


def run_federated(model: str, mode: str = "lora", clients: int = 4, rounds: int = 2, local_steps: int = 2, batch: int = 1,
                  seqlen: int = 128, lr: float = 1e-4, lora_rank: int = 16, data: str = "gensim-wiki", seed: int = 0,
                  cpus: int = 2, lora_targets: tuple[str, ...] = LORA_TARGETS) -> dict:
    """Run ``rounds`` of federated fine-tuning on ``clients`` simulated nodes; returns the bytes
    of each round, the analytic payload, the clients' losses and the final global state."""
    require_flower()
    if mode not in MODES:
        raise LeanfmError(f"federated mode {mode!r} is not one of {', '.join(MODES)}")
    if isinstance(lora_targets, str) or not lora_targets or not all(isinstance(t, str) and t and "," not in t for t in lora_targets):
        raise LeanfmError(f"lora_targets must be a non-empty tuple of module names (e.g. ('q_proj', 'v_proj')), got {lora_targets!r}")
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from ..models.load import load

    base, _ = load(model)
    torch.manual_seed(seed)
    targets = ",".join(lora_targets)
    cfg = {"model": model, "mode": "lora" if mode == "lora8" else mode, "lora_rank": lora_rank, "lora_targets": targets, "seed": seed}
    trainable = _trainable_state_of(base, cfg)
    _JOB.clear()
    _JOB.update(model=model, mode=mode, clients=clients, rounds=rounds, local_steps=local_steps, batch=batch, seqlen=seqlen,
                lr=lr, lora_rank=lora_rank, lora_targets=targets, data=data, seed=seed, initial=trainable)
    client_app = ClientApp()
    client_app.train()(client_train)
    server_app = ServerApp()
    server_app.main()(server_main)
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    wall = time.perf_counter() - t0
    if "rounds_bytes" not in _JOB:
        raise LeanfmError("the Flower simulation ended without finishing its rounds (see its log above)")
    shapes = [tuple(v.shape) for v in trainable.values()]
    per_round = [r["down_bytes"] + r["up_bytes"] for r in _JOB["rounds_bytes"]]
    return {"mode": mode, "clients": clients, "rounds": rounds, "local_steps": local_steps, "lora_targets": targets, "trainable_params":
            sum(int(np.prod(s)) for s in shapes), "network_bytes_per_round": float(np.mean(per_round)),
            "rounds_bytes": _JOB["rounds_bytes"], "payload_bytes_per_round": payload_bytes(shapes, mode, clients),
            "train_metrics": _JOB["train_metrics"], "wall_seconds": wall, "final_state": _JOB["final"]}


def _trainable_state_of(base, cfg: dict) -> dict[str, torch.Tensor]:
    import copy

    return trainable_state(prepare(copy.deepcopy(base), cfg["mode"], cfg["lora_rank"], tuple(cfg["lora_targets"].split(","))))
