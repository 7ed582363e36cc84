"""``leanfm tune`` arguments and command (kept beside the runner so cli.py stays a dispatcher)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from ..errors import LeanfmError

# flags that set a field of the tuning step; a flag left unset keeps the method's own default
STEP_FLAGS = ("steps", "lr", "seqlen", "batch", "seed", "data", "optimizer", "schedule", "warmup", "weight_decay", "rank",
              "lora_alpha", "targets", "teacher", "temperature", "kd_weight", "hidden_weight", "adapter", "eps", "quant_type",
              "checkpointing")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--method", required=True, help="lora | dora | qlora | full | kd | mezo (leanfm methods NAME: every field)")
    s.add_argument("--recipe", default=None, help="compress first with this recipe (built-in name or YAML), then tune; "
                   "kd's teacher is the model before it")
    s.add_argument("--out", default=None, help="results folder (default runs/tune-<timestamp>); the tuned checkpoint is "
                   "saved in <out>/checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace the results already in --out (default: refuse)")
    s.add_argument("--no-save", dest="save", action="store_false", help="measure only; do not write <out>/checkpoint")
    t = s.add_argument_group("training (unset: the method's default, see leanfm methods NAME)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--seqlen", type=int, help="tokens per training window")
    t.add_argument("--batch", type=int, help="training windows per step")
    t.add_argument("--seed", type=int, help="order of the training windows")
    t.add_argument("--data", help="training text: gensim-wiki (default) or a local .txt (never the evaluation split)")
    t.add_argument("--optimizer", help="adamw | adamw8bit | sgd")
    t.add_argument("--schedule", help="constant | cosine")
    t.add_argument("--warmup", type=int, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--checkpointing", action="store_true", default=None, help="gradient checkpointing")
    t.add_argument("--rank", type=int, help="LoRA rank (lora, dora, qlora; kd with --adapter lora)")
    t.add_argument("--lora-alpha", type=float, help="LoRA scale numerator")
    t.add_argument("--targets", help="comma-separated module names for the adapters (default all-linear)")
    t.add_argument("--teacher", help="kd: teacher model (default: --model, before --recipe)")
    t.add_argument("--temperature", type=float, help="kd: softmax temperature")
    t.add_argument("--kd-weight", type=float, help="kd: weight of the distillation term (rest: next-token loss)")
    t.add_argument("--hidden-weight", type=float, help="kd: weight of last-hidden-state matching")
    t.add_argument("--adapter", help="kd: none (all weights) | lora")
    t.add_argument("--eps", type=float, help="mezo: perturbation size")
    t.add_argument("--quant-type", help="qlora: nf4 | fp4")
    e = s.add_argument_group("evaluation (the standard protocol, before and after)")
    e.add_argument("--dataset", default="wikitext2", help="evaluation text (default wikitext2)")
    e.add_argument("--split", default="test", help="evaluation split (default test)")
    e.add_argument("--data-dir", default=None, help="folder holding wikitext-2/{test,valid}.txt")
    e.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    e.add_argument("--max-eval-tokens", type=int, default=65536, help="evaluate at most this many tokens (default 65536)")
    e.add_argument("--max-fidelity-tokens", type=int, default=None, help="fidelity metrics on the first windows covering this many tokens")
    e.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, pinned (default: all cores)")
    c = s.add_argument_group("calibration (for the compression recipe's methods that need it)")
    c.add_argument("--calib-dataset", default="gensim-wiki")
    c.add_argument("--calib-samples", type=int, default=128)
    c.add_argument("--calib-seqlen", type=int, default=512)


def step_from_args(a) -> dict:
    """The tuning step as a recipe step dict: the method and every flag the user set."""
    from ..config import config_class

    cls = config_class(a.method)
    if cls.produces != "tuned-weights":
        from .run import tune_config

        tune_config({"method": a.method})  # refused there, in the one wording
    fields = {f.name for f in dataclasses.fields(cls)}
    step = {"method": a.method}
    for name in STEP_FLAGS:
        v = getattr(a, name, None)
        if v is None:
            continue
        if name not in fields:
            flag = "--" + name.replace("_", "-")
            raise LeanfmError(f"{flag} does not apply to --method {a.method} (leanfm methods {a.method} lists its fields)")
        step[name] = [t.strip() for t in v.split(",") if t.strip()] if name == "targets" else v
    return step


def run(a) -> int:
    from ..data.calib import calibration
    from ..measure.protocol import Protocol
    from ..outdir import default_out
    from ..report import print_table, write_report
    from .run import tune

    step = step_from_args(a)
    protocol = Protocol(dataset=a.dataset, split=a.split, data_dir=a.data_dir, seqlen=a.eval_seqlen,
                        max_eval_tokens=a.max_eval_tokens, max_fidelity_tokens=a.max_fidelity_tokens, threads=a.threads)
    calib = calibration(a.calib_dataset, a.calib_samples, a.calib_seqlen, data_dir=a.data_dir)
    out = a.out or default_out("tune")
    results = tune(a.model, step, a.recipe, out, protocol, calib, overwrite=a.overwrite, save=a.save)
    print_table(results)
    tuned = results["runs"][-1]
    m = tuned["metrics"]
    print(f"trained {m.get('trainable_params', 0):,} parameters for {m.get('train_seconds', 0):.0f} s "
          f"({m.get('train_tokens_per_s', 0):.0f} training tokens/s), peak RSS while training "
          f"{m.get('peak_train_rss_bytes', 0) / 1e9:.2f} GB"
          + (f"; perplexity gap recovered {m['ppl_gap_recovered']:.1%}" if "ppl_gap_recovered" in m else ""))
    if tuned.get("checkpoint"):
        print(f"checkpoint: {tuned['checkpoint']}")
    print(f"results: {out}/results.json\nreport:  {write_report(results, out)}")
    return 0
