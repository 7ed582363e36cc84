"""Data-parallel fine-tuning on CPU (torch.distributed, gloo) with the network bytes counted.

``world`` processes each train a replica on their own shard of the training windows; DDP averages
the gradients through a communication hook every step. Three modes:

- ``full``: every weight trains; the hook all-reduces the gradient buckets (``allreduce_hook``);
- ``lora``: peft LoRA adapters train; DDP's buckets hold only the adapters' gradients;
- ``powersgd``: full fine-tuning with PowerSGD (Vogels et al., 2019): each gradient matrix is
  sent as two rank-r factors P (n x r) and Q (m x r), with error feedback (torch's ``powerSGD_hook``);
  matrices too small to gain at least ``min_compression_rate`` (and 1-D tensors) go uncompressed.
  Each bucket's chain of all-reduces (raw tensors, then P, then Q, each issued when the previous
  completes) finishes before the next bucket's starts: gloo matches collectives by the order
  they are issued, and with several buckets in flight the two workers could issue them in
  different orders (seen on SmolLM2-135M: gloo aborted on 39,936 vs 2,304 bytes).

Bytes are counted where they enter the collective: ``torch.distributed.all_reduce`` is wrapped in
each worker, so every tensor a hook hands to gloo is counted (elements x element size), per step
and per worker. ``network_bytes_per_step`` sums the workers. :func:`analytic_bytes` is the same
count from the trainable parameters' shapes alone, for the check that the two agree.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import torch

from ..errors import LeanfmError

MODES = ("full", "lora", "powersgd")


def analytic_bytes(shapes: list[tuple[int, ...]], mode: str, rank: int = 4, min_compression_rate: float = 2.0,
                   elem: int = 4) -> int:
    """Bytes one worker hands to all-reduce per step for trainable gradients of ``shapes``
    (PowerSGD: P and Q per compressed matrix, the rest raw, by the hook's own rule)."""
    total = 0
    for shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        if mode != "powersgd":
            total += numel
            continue
        n = shape[0]
        m = numel // n
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r * min_compression_rate < n * m else numel
    return total * elem


def _one_bucket_at_a_time(hook):
    """``hook`` with its future waited on before the hook returns, so that one bucket's collectives
    are all issued and done before the next bucket's hook runs (same order on every worker)."""

    def serial(state, bucket):
        fut = hook(state, bucket)
        fut.wait()
        return fut

    return serial


def _worker(rank: int, world: int, store: str, job: dict, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counted = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):
        counted[0] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting_all_reduce  # the hooks below call it through torch.distributed
    try:
        from ..data.calib import encode
        from ..methods.tune.adapters import make_trainable
        from ..methods.tune.handler import training_text
        from ..methods.tune.kd import next_token_loss
        from ..methods.tune.loop import training_windows
        from ..models.load import load

        model, tok = load(job["model"])
        torch.manual_seed(job["seed"])
        model = make_trainable(model, "full" if job["mode"] == "powersgd" else job["mode"], job["lora_rank"])
        model.train()
        shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        ddp = DDP(model, bucket_cap_mb=job["bucket_mb"])
        if job["mode"] == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=job["psgd_rank"],
                                       start_powerSGD_iter=job["psgd_start"], min_compression_rate=2)
            ddp.register_comm_hook(state, _one_bucket_at_a_time(psgd.powerSGD_hook))
        else:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        ids = encode(tok, training_text(job["data"]))
        windows = training_windows(ids, job["steps"] * job["batch"] * world, job["seqlen"], job["seed"])[rank::world]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job["lr"])
        per_step, losses = [], []
        t0 = time.perf_counter()
        for step in range(job["steps"]):
            batch = windows[step * job["batch"] : (step + 1) * job["batch"]]
            counted[0] = 0
            loss = next_token_loss(ddp(batch, use_cache=False).logits, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            per_step.append(counted[0])
            losses.append(loss.item())
        out.put({"rank": rank, "bytes_per_step": per_step, "loss": losses, "shapes": shapes,
                 "seconds": time.perf_counter() - t0, "trainable_params": sum(math.prod(s) for s in shapes)})
    except BaseException as e:  # noqa: BLE001 - reported to the parent in one line
        out.put({"rank": rank, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    finally:
        dist.all_reduce = real_all_reduce
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(q, procs: list, deadline: float) -> list[dict]:
    """Each worker's report; a worker that dies without one (gloo aborts the process on some
    errors) ends the wait at once instead of at the deadline."""
    import queue

    got: list[dict] = []
    while len(got) < len(procs):
        try:
            got.append(q.get(timeout=1.0))
            continue
        except queue.Empty:
            pass
        reported = {g["rank"] for g in got}
        dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
        if dead:
            r, code = dead[0]
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise LeanfmError(f"data-parallel worker {r} died ({how}) before reporting; its stderr above says why")
        if time.perf_counter() > deadline:
            raise LeanfmError(f"data-parallel workers did not report within the timeout ({len(got)} of {len(procs)} did)")
    return got


def run_ddp(model: str, mode: str = "full", steps: int = 4, batch: int = 1, seqlen: int = 128, world: int = 2,
            threads: int = 1, lr: float = 1e-5, lora_rank: int = 16, psgd_rank: int = 4, psgd_start: int = 2,
            data: str = "gensim-wiki", seed: int = 0, bucket_mb: float = 25.0, timeout_s: float = 1800) -> dict:
    """Train ``world`` data-parallel replicas of ``model`` for ``steps`` steps; returns the bytes
    each worker handed to all-reduce per step, the analytic count, the losses and the wall time.
    ``bucket_mb`` is DDP's gradient bucket size (its default, 25 MB)."""
    import multiprocessing as mp

    if mode not in MODES:
        raise LeanfmError(f"data-parallel mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "powersgd" and psgd_start < 2:
        raise LeanfmError(f"psgd_start={psgd_start}: PowerSGD with error feedback starts compressing at step 2 at the earliest")
    if world < 2:
        raise LeanfmError(f"data parallel needs at least 2 workers, got world={world}")
    job = dict(model=model, mode=mode, steps=steps, batch=batch, seqlen=seqlen, threads=threads, lr=lr, lora_rank=lora_rank,
               psgd_rank=psgd_rank, psgd_start=psgd_start, data=data, seed=seed, bucket_mb=bucket_mb)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="leanfm-ddp-") as tmp:
        store = os.path.join(tmp, "store")
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(r, world, store, job, q)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            got = _collect(q, procs, t0 + timeout_s)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        wall = time.perf_counter() - t0
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        raise LeanfmError(f"a data-parallel worker failed: {errors[0]}")
    got.sort(key=lambda g: g["rank"])
    shapes = got[0]["shapes"]
    measured = [sum(g["bytes_per_step"][s] for g in got) for s in range(steps)]
    compressed_from = psgd_start if mode == "powersgd" else 0
    steady = measured[compressed_from:] or measured
    analytic = analytic_bytes(shapes, mode, psgd_rank) * world
    return {"mode": mode, "world": world, "threads_per_worker": threads, "steps": steps, "batch": batch, "seqlen": seqlen,
            "trainable_params": got[0]["trainable_params"], "network_bytes_per_step": sum(steady) / len(steady),
            "network_bytes_per_step_each": measured, "analytic_bytes_per_step": analytic,
            "uncompressed_steps": compressed_from, "loss": [g["loss"] for g in got], "wall_seconds": wall,
            "train_seconds": max(g["seconds"] for g in got)}
