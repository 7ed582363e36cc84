"""Fine-tuning on smollm2-135m (issue 17): recovery, memory, merging, network, prediction.

    python benchmarks/tune.py [--part recovery|memory|merge|network|all] [--threads 2] [--out runs/tune-bench]

Parts (each prints its table and writes <out>/<part>.json):

- ``recovery``: after ``--recipe`` (default wanda50), distillation (``kd``, the uncompressed model
  as teacher) and plain next-token fine-tuning (``full``) for the same steps on the same windows
  of gensim-wiki; perplexity on WikiText-2 test (``--eval-tokens``, default 65536) before and
  after, the share of the gap recovered, training time. ``--recovery-methods kd`` runs one alone
  (the 30-minute budget is distillation's: run it on an otherwise idle machine); fidelity to the
  baseline is scored on ``--fidelity-tokens`` (default 4096) to keep the evaluations short.
- ``memory``: each method for a few steps in a fresh process (``leanfm tune``), so each peak is
  its own: ``peak_train_rss_bytes`` measured and predicted (``leanfm.predict.training``), the
  inference peak of the same model, trainable parameters (ours and peft's), MeZO's loss curve.
- ``merge``: a LoRA trained for a few steps, perplexity unmerged (peft) vs merged vs the merged
  checkpoint reloaded in plain transformers.
- ``network``: data parallel on gloo (2 processes x 1 thread: full, LoRA, PowerSGD) and federated
  with Flower's simulation (4 clients, FedAvg: full, LoRA on q and v by default, LoRA with 8-bit updates): bytes counted
  at the collective / the serialized messages vs the count from the shapes, and the perplexity of
  the federated LoRA model with and without 8-bit updates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _leanfm() -> str:
    return str(Path(sys.executable).with_name("leanfm"))


def recovery(a, out: Path) -> dict:
    import leanfm
    from leanfm.measure.protocol import Protocol

    proto = Protocol(max_eval_tokens=a.eval_tokens, max_fidelity_tokens=a.fidelity_tokens, threads=a.threads)
    calib = leanfm.Calibration(n=a.calib_samples, seqlen=a.calib_seqlen)  # one: its tokens are reused across methods
    rows = {}
    for method in a.recovery_methods.split(","):
        step = {"method": method, "steps": a.steps, "batch": a.batch, "seqlen": a.seqlen, "lr": a.lr, "warmup": a.steps // 10}
        if method == "kd":  # only the flags given: the method's own defaults otherwise
            step.update({k: v for k, v in (("temperature", a.kd_temperature), ("kd_weight", a.kd_weight),
                                           ("hidden_weight", a.kd_hidden_weight)) if v is not None})
        t0 = time.perf_counter()
        res = leanfm.tune(MODEL, step, a.recipe, out / f"recovery-{method}", proto, calib=calib, overwrite=True, save=False)
        runs = {r["role"]: r["metrics"] for r in res["runs"]}
        rows[method] = {"baseline": runs["baseline"]["perplexity"], "compressed": runs["compressed"]["perplexity"],
                        "tuned": runs["tuned"]["perplexity"], "gap_recovered": runs["tuned"].get("ppl_gap_recovered"),
                        "train_seconds": runs["tuned"]["train_seconds"], "wall_seconds": time.perf_counter() - t0,
                        "eval_tokens": runs["tuned"]["eval_tokens"], "step": step}
    print(f"\nrecipe {a.recipe} (calibration {a.calib_samples} x {a.calib_seqlen} tokens of gensim-wiki), {a.steps} steps of {a.batch}x{a.seqlen} tokens of gensim-wiki, {a.threads} threads; "
          f"WikiText-2 test, {next(iter(rows.values()))['eval_tokens']} tokens")
    print("| method | ppl baseline | ppl compressed | ppl tuned | gap recovered | training s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        extra = {k: v for k, v in r["step"].items() if k in ("temperature", "kd_weight", "hidden_weight")}
        m = m + (" (" + ", ".join(f"{k} {v:g}" for k, v in extra.items()) + ")" if extra else "")
        print(f"| {m} | {r['baseline']:.3f} | {r['compressed']:.3f} | {r['tuned']:.3f} | {r['gap_recovered']:.1%} | "
              f"{r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    return rows


MEMORY_RUNS = [
    ("full", []), ("full+ckpt", ["--checkpointing"]), ("lora", []), ("lora+ckpt", ["--checkpointing"]),
    ("qlora", []), ("mezo", []), ("full+adamw8bit", ["--optimizer", "adamw8bit"]),
]


def memory(a, out: Path) -> dict:
    rows = {}
    for name, extra in MEMORY_RUNS:
        if a.runs and name not in a.runs.split(","):
            continue
        method = name.split("+")[0]
        steps = a.mezo_steps if method == "mezo" else a.memory_steps
        d = out / f"memory-{name}"
        cmd = [_leanfm(), "tune", "--model", MODEL, "--method", method, "--steps", str(steps), "--batch", str(a.batch),
               "--seqlen", str(a.seqlen), "--threads", str(a.threads), "--max-eval-tokens", "4096", "--no-save",
               "--out", str(d), "--overwrite", *extra]
        if method == "mezo":
            cmd += ["--lr", str(a.mezo_lr)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        runs = json.loads((d / "results.json").read_text())["runs"]
        run, base = runs[-1], runs[0]
        m, t = run["metrics"], run["details"]["training"]
        rows[name] = {"trainable": m["trainable_params"], "trainable_peft": t.get("trainable_params_peft"),
                      "peak_train": m["peak_train_rss_bytes"], "predicted": m["predicted_peak_train_rss_bytes"],
                      "error_pct": m["train_memory_prediction_error_pct"], "inference_peak": base["metrics"]["peak_rss_bytes"],
                      "malloc_mmap_threshold": t.get("malloc_mmap_threshold"),
                      "tokens_per_s": m["train_tokens_per_s"], "loss": t["loss_curve"], "plan": t["plan"]}
    print(f"\n{a.memory_steps} steps (MeZO {a.mezo_steps}) of {a.batch}x{a.seqlen} tokens, {a.threads} threads, each in a fresh process; "
          f"inference peak: the untuned model's under the standard protocol, before training in the same process; "
          f"glibc mmap threshold during training: {next(iter(rows.values()))['malloc_mmap_threshold']}")
    print("| run | trainable (peft) | peak train RSS GB | predicted GB | error | inference peak GB | train / inference | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        peft = f" ({r['trainable_peft']:,})" if r["trainable_peft"] is not None else ""
        print(f"| {n} | {r['trainable']:,}{peft} | {r['peak_train'] / 1e9:.2f} | {r['predicted'] / 1e9:.2f} | {r['error_pct']:+.1f}% | "
              f"{r['inference_peak'] / 1e9:.2f} | {r['peak_train'] / r['inference_peak']:.2f} | {r['tokens_per_s']:.0f} |")
    if "mezo" in rows:
        loss = rows["mezo"]["loss"]
        k = max(1, len(loss) // 5)
        print(f"MeZO loss: first {k} steps mean {sum(loss[:k]) / k:.4f}, last {k} steps mean {sum(loss[-k:]) / k:.4f}")
    return rows


def merge(a, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import leanfm
    from leanfm.config import config_from_dict
    from leanfm.data.calib import encode
    from leanfm.data.text import load_text
    from leanfm.measure.quality import evaluate, make_windows
    from leanfm.methods.tune.adapters import add_lora, merge as merge_adapters
    from leanfm.methods.tune.handler import training_text
    from leanfm.methods.tune.loop import train, training_windows
    from leanfm.models.checkpoint import save_checkpoint

    torch.set_num_threads(a.threads)
    model, tok = leanfm.load(MODEL)
    cfg = config_from_dict({"method": "lora", "steps": a.memory_steps, "batch": a.batch, "seqlen": a.seqlen, "lr": 1e-3})
    for p in model.parameters():
        p.requires_grad_(False)
    pm = add_lora(model, cfg.lora_spec())
    train(pm, cfg, training_windows(encode(tok, training_text("gensim-wiki")), cfg.steps * cfg.batch, cfg.seqlen, 0))
    windows = make_windows(encode(tok, load_text("wikitext2", "test")), 2048, a.merge_tokens, None)
    with torch.no_grad():
        unmerged = evaluate(pm, windows)["perplexity"]
    merged_model = merge_adapters(pm)
    with torch.no_grad():
        merged = evaluate(merged_model, windows)["perplexity"]
    path = save_checkpoint(merged_model, out / "merged-lora", tok, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        reloaded = evaluate(hf, windows)["perplexity"]
    r = {"unmerged": unmerged, "merged": merged, "reloaded": reloaded, "tokens": int(windows.numel() - windows.shape[0]),
         "rel_merged": merged / unmerged - 1, "rel_reloaded": reloaded / unmerged - 1}
    print(f"\nLoRA after {cfg.steps} steps; WikiText-2 test, {r['tokens']} tokens: unmerged (peft) {unmerged:.5f}, merged "
          f"{merged:.5f} ({r['rel_merged']:+.2e} relative), reloaded in transformers {reloaded:.5f} ({r['rel_reloaded']:+.2e})")
    return r


def network(a, out: Path) -> dict:
    from leanfm.training.ddp import run_ddp
    from leanfm.training.federated import run_federated

    rows: dict = {"ddp": {}, "fl": {}}
    for mode in ("full", "lora", "powersgd") if a.network in ("all", "ddp") else ():
        r = run_ddp(MODEL, mode, steps=4, batch=1, seqlen=128, world=2, threads=1, lora_rank=16, psgd_rank=4, psgd_start=2)
        rows["ddp"][mode] = {k: v for k, v in r.items() if k != "loss"}
    if rows["ddp"]:
        print("\ndata parallel, gloo, 2 processes x 1 thread, 4 steps of 1x128 tokens each")
        print("| mode | trainable | measured bytes/step | analytic | measured / analytic | vs full |")
        print("|---|---|---|---|---|---|")
        full = rows["ddp"]["full"]["network_bytes_per_step"]
        for m, r in rows["ddp"].items():
            print(f"| {m} | {r['trainable_params']:,} | {r['network_bytes_per_step']:,.0f} | {r['analytic_bytes_per_step']:,} | "
                  f"{r['network_bytes_per_step'] / r['analytic_bytes_per_step']:.4f} | {full / r['network_bytes_per_step']:.1f}x less |")
    if a.network == "ddp":
        return rows
    states = {}
    for mode in a.fl_modes.split(","):
        r = run_federated(MODEL, mode, clients=4, rounds=a.fl_rounds, local_steps=2, batch=1, seqlen=128, lr=1e-4 if mode != "full" else 1e-5,
                          lora_targets=tuple(a.fl_lora_targets.split(",")))
        states[mode] = r.pop("final_state")
        rows["fl"][mode] = r
    print(f"\nfederated, Flower simulation on Ray, 4 clients, FedAvg, {a.fl_rounds} rounds of 2 local steps; "
          f"LoRA rank 16 on {a.fl_lora_targets}")
    print("| mode | trainable | measured bytes/round | tensors' bytes (analytic) | measured / analytic | vs full | wall s |")
    print("|---|---|---|---|---|---|---|")
    full = rows["fl"].get("full", {}).get("network_bytes_per_round", float("nan"))
    for m, r in rows["fl"].items():
        print(f"| {m} | {r['trainable_params']:,} | {r['network_bytes_per_round']:,.0f} | {r['payload_bytes_per_round']:,} | "
              f"{r['network_bytes_per_round'] / r['payload_bytes_per_round']:.4f} | {full / r['network_bytes_per_round']:.1f}x less | "
              f"{r['wall_seconds']:.0f} |")
    fl = rows["fl"]
    print(f"LoRA vs full: {full / fl['lora']['network_bytes_per_round']:.1f}x fewer bytes per round; "
          f"8-bit LoRA updates vs fp32: {fl['lora']['network_bytes_per_round'] / fl['lora8']['network_bytes_per_round']:.2f}x fewer")
    rows["fl_quality"] = _fl_quality(states, a)
    return rows


def _fl_quality(states: dict, a) -> dict:
    """Perplexity of the base model with the federated LoRA adapters, fp32 vs 8-bit updates."""
    import torch

    import leanfm
    from leanfm.data.calib import encode
    from leanfm.data.text import load_text
    from leanfm.measure.quality import evaluate, make_windows
    from leanfm.training.federated import prepare

    model, tok = leanfm.load(MODEL)
    windows = make_windows(encode(tok, load_text("wikitext2", "test")), 2048, a.merge_tokens, None)
    out = {}
    with torch.no_grad():
        out["base"] = evaluate(model, windows)["perplexity"]
        for mode in ("lora", "lora8"):
            m, _ = leanfm.load(MODEL)
            pm = prepare(m, "lora", 16, tuple(a.fl_lora_targets.split(",")))
            pm.load_state_dict(states[mode], strict=False)
            out[mode] = evaluate(pm.eval(), windows)["perplexity"]
    print(f"federated LoRA, WikiText-2 test {int(windows.numel() - windows.shape[0])} tokens: base {out['base']:.4f}, "
          f"fp32 updates {out['lora']:.4f}, 8-bit updates {out['lora8']:.4f} ({out['lora8'] / out['lora'] - 1:+.3%})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["recovery", "memory", "merge", "network", "all"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/tune-bench")
    ap.add_argument("--recipe", default="wanda50")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--fidelity-tokens", type=int, default=4096,
                    help="recovery: tokens for top-1 agreement / KL to the baseline (a second forward of the reference)")
    ap.add_argument("--calib-samples", type=int, default=32, help="recovery: calibration windows for --recipe")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="recovery: tokens per calibration window")
    ap.add_argument("--recovery-methods", default="kd,full",
                    help="recovery: the tuning methods to run, each after --recipe (kd: distillation; full: plain next-token)")
    ap.add_argument("--kd-temperature", type=float, default=None, help="recovery: kd's temperature (default: the method's, 1)")
    ap.add_argument("--kd-weight", type=float, default=None, help="recovery: kd's share of the loss; the rest is next-token "
                    "cross-entropy (default: the method's, 0.5)")
    ap.add_argument("--kd-hidden-weight", type=float, default=None, help="recovery: weight of last-hidden-state matching "
                    "(default: the method's, 0)")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--runs", default="", help="memory part: only these runs (comma-separated names of MEMORY_RUNS)")
    ap.add_argument("--mezo-steps", type=int, default=60)
    ap.add_argument("--mezo-lr", type=float, default=1e-6)
    ap.add_argument("--merge-tokens", type=int, default=16384)
    ap.add_argument("--fl-rounds", type=int, default=2)
    ap.add_argument("--fl-modes", default="full,lora,lora8", help="network part: the federated modes to run (lora and lora8 are needed)")
    ap.add_argument("--fl-lora-targets", default="q_proj,v_proj", help="network part: the linears federated LoRA adapts "
                    "(all-linear: every linear but the head)")
    ap.add_argument("--network", default="all", choices=["all", "ddp", "fl"], help="network part: data parallel, federated or both")
    a = ap.parse_args()
    os.environ.setdefault("LEANFM_PROGRESS_EVERY", "60")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["recovery", "memory", "merge", "network"] if a.part == "all" else [a.part]
    for part in parts:
        t0 = time.perf_counter()
        res = globals()[part](a, out)
        (out / f"{part}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
