#!/usr/bin/env python
"""Peer baseline: GPTQ from vllm-project/llm-compressor on the same model/data.

Runs under ``.venv-peer/bin/python`` (see ``benchmarks/peer_setup.sh``); it does
NOT import leanfm.  Inputs are a plain HF fp32 model dir and a ``.pt`` file with
``{"calib": LongTensor[n, Lc], "eval": LongTensor[m, L]}`` token ids.

    .venv-peer/bin/python benchmarks/peer_llmcompressor.py \\
        --model-dir ~/.cache/leanfm/models/smollm2-135m --data data.pt \\
        --scheme w4g64 --actorder static --out peer.json

What it does:
  1. load the model in fp32, score ``eval`` windows (ppl_fp32);
  2. ``llmcompressor.oneshot`` with one ``GPTQModifier`` whose config_groups
     encode the scheme (targets Linear, ignore lm_head, int symmetric,
     weight-only), calibrated on exactly the ``calib`` rows (no shuffle, all
     rows, batch 1, max_seq_length = calib seqlen); wall time of that call is
     ``wall_s_compress``;
  3. score ``eval`` windows with the compressed model (ppl_quant).  After
     oneshot the Linear weights hold GPTQ's dequantized values (on the int grid
     times scale) and compressed-tensors' forward fake-quantizes them again
     (idempotent), i.e. the evaluation is fake-quant / dequantized fp32.

Perplexity: each eval window is scored independently; logits at positions
0..L-2 predict tokens 1..L-1; NLL summed over all scored tokens;
ppl = exp(total / count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCHEMES = {
    # name: (num_bits, strategy, group_size)
    "w4g64": (4, "group", 64),
    "w4": (4, "channel", None),
    "w3": (3, "channel", None),
}
ACTORDERS = ("none", "static", "group", "weight")
DAMPENING_FRAC = 0.01
BLOCK_SIZE = 128


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="plain HF fp32 model dir (config.json, model.safetensors, tokenizer)")
    p.add_argument("--data", required=True, help='.pt file: {"calib": LongTensor[n, Lc], "eval": LongTensor[m, L]}')
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    p.add_argument("--actorder", default="static", choices=ACTORDERS,
                   help="GPTQ activation ordering (llm-compressor default: static == weight). "
                        "'group' was removed in compressed-tensors 0.19 and errors out.")
    p.add_argument("--out", required=True, help="output JSON path")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--skip-fp32-eval", action="store_true", help="do not score the fp32 model (ppl_fp32 = null)")
    return p.parse_args(argv)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"),
                      ("llmcompressor", "llmcompressor"), ("compressed_tensors", "compressed-tensors")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            out[key] = None
    out["python"] = platform.python_version()
    return out


def _recipe(scheme: str, actorder: str):
    from llmcompressor.modifiers.gptq import GPTQModifier

    num_bits, strategy, group_size = SCHEMES[scheme]
    weights = {
        "num_bits": num_bits,
        "type": "int",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": False,
    }
    if group_size is not None:
        weights["group_size"] = group_size
    config_groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
        }
    }
    kw = {}
    if actorder == "none":
        kw["actorder"] = None
    else:
        kw["actorder"] = actorder  # "static" (== "weight") / "weight" / "group" (rejected by c-t 0.19)
    mod = GPTQModifier(
        config_groups=config_groups,
        ignore=["lm_head"],
        block_size=BLOCK_SIZE,
        dampening_frac=DAMPENING_FRAC,
        **kw,
    )
    return mod, weights, config_groups


def _default_actorder() -> str:
    """What GPTQModifier does when actorder is not passed."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    a = GPTQModifier.model_fields["actorder"].default
    return str(getattr(a, "value", a))


@__import__("torch").no_grad()
def perplexity(model, windows) -> tuple[float, int, float]:
    """Return (ppl, scored_tokens, total_nll). Each window scored independently."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    count = 0
    model.eval()
    for row in windows:
        ids = row.unsqueeze(0).to(torch.long)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        tgt = ids[0, 1:]
        total += float(F.cross_entropy(logits, tgt, reduction="sum").double())
        count += int(tgt.numel())
        del logits
    return math.exp(total / count), count, total


def _grid_check(model, scheme: str) -> dict:
    """Verify quantized Linear weights lie on the int grid (W/scale integer in range)."""
    import torch

    num_bits, strategy, group_size = SCHEMES[scheme]
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    n_mod = 0
    max_dev = 0.0
    out_of_range = 0
    levels_used = set()
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or not hasattr(m, "weight_scale"):
            continue
        n_mod += 1
        w = m.weight.detach().float()
        s = m.weight_scale.detach().float()
        if strategy == "group":
            s = s.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
        else:
            s = s.reshape(-1, 1)
        q = w / s
        max_dev = max(max_dev, float((q - q.round()).abs().max()))
        qr = q.round()
        out_of_range += int(((qr < qmin) | (qr > qmax)).sum())
        levels_used.update(int(v) for v in torch.unique(qr).tolist())
    return {"quantized_linear_modules": n_mod, "max_abs_dev_from_int_grid": max_dev,
            "n_out_of_range": out_of_range, "int_levels_used": sorted(levels_used)}


def main(argv=None) -> int:
    a = _parse(argv)
    if a.actorder == "group":
        # llmcompressor 0.14 / compressed-tensors 0.19: QuantizationArgs accepts the
        # enum value but gptq.helpers.apply_activation_ordering raises
        # "Only 'weight' and 'static' are supported" at the first layer; fail early.
        raise SystemExit("[peer] actorder=group (dynamic/g_idx act-order) was removed in "
                         "llm-compressor 0.14 / compressed-tensors 0.19; use static (== weight) or none")
    import torch

    torch.set_num_threads(max(1, a.threads))
    try:
        torch.set_num_interop_threads(max(1, a.threads))
    except RuntimeError:
        pass

    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    data = torch.load(a.data, map_location="cpu", weights_only=True)
    calib = data["calib"].to(torch.long).contiguous()
    evalw = data["eval"].to(torch.long).contiguous()
    if calib.dim() != 2 or evalw.dim() != 2:
        raise SystemExit(f"calib/eval must be 2-D LongTensors, got {tuple(calib.shape)} / {tuple(evalw.shape)}")
    n_calib, calib_seqlen = calib.shape

    tok = transformers.AutoTokenizer.from_pretrained(a.model_dir)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    attn_impl = getattr(model.config, "_attn_implementation", None)

    ppl_fp32 = fp32_tokens = None
    eval_fp32_s = None
    if not a.skip_fp32_eval:
        t0 = time.perf_counter()
        ppl_fp32, fp32_tokens, _ = perplexity(model, evalw)
        eval_fp32_s = time.perf_counter() - t0
        print(f"[peer] ppl_fp32={ppl_fp32:.4f} over {fp32_tokens} tokens ({eval_fp32_s:.1f}s)", flush=True)

    ds = Dataset.from_dict({
        "input_ids": calib.tolist(),
        "attention_mask": torch.ones_like(calib).tolist(),
    })

    try:
        modifier, weights_cfg, config_groups = _recipe(a.scheme, a.actorder)
    except Exception as e:  # e.g. actorder="group" removed in compressed-tensors 0.19
        raise SystemExit(f"[peer] cannot build GPTQModifier for scheme={a.scheme} actorder={a.actorder}: {e}")

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tok,
        recipe=[modifier],
        dataset=ds,
        num_calibration_samples=n_calib,
        shuffle_calibration_samples=False,
        max_seq_length=calib_seqlen,
        batch_size=1,
        pipeline="sequential",
        save_compressed=False,
    )
    wall_s_compress = time.perf_counter() - t0
    print(f"[peer] oneshot GPTQ {a.scheme} actorder={a.actorder}: {wall_s_compress:.1f}s", flush=True)

    # resolved args as llm-compressor actually applied them
    resolved = None
    for _, m in model.named_modules():
        qs = getattr(m, "quantization_scheme", None)
        if qs is not None and qs.weights is not None:
            resolved = json.loads(qs.weights.model_dump_json())
            break
    grid = _grid_check(model, a.scheme)

    t0 = time.perf_counter()
    ppl_quant, q_tokens, _ = perplexity(model, evalw)
    eval_q_s = time.perf_counter() - t0
    print(f"[peer] ppl_quant={ppl_quant:.4f} over {q_tokens} tokens ({eval_q_s:.1f}s)", flush=True)

    res = {
        "tool": "llm-compressor",
        "scheme": a.scheme,
        "actorder": a.actorder,
        "actorder_llmcompressor_default": _default_actorder(),
        "n_calib": int(n_calib),
        "calib_seqlen": int(calib_seqlen),
        "eval_windows": int(evalw.shape[0]),
        "eval_seqlen": int(evalw.shape[1]),
        "eval_tokens": int(q_tokens),
        "ppl_fp32": ppl_fp32,
        "ppl_quant": ppl_quant,
        "wall_s_compress": wall_s_compress,
        "wall_s_load": load_s,
        "wall_s_eval_fp32": eval_fp32_s,
        "wall_s_eval_quant": eval_q_s,
        "threads": a.threads,
        "eval_mode": "fake-quant: weights hold GPTQ dequantized values (int grid * scale), fp32 compute",
        "versions": _versions(),
        "settings": {
            "dampening_frac": DAMPENING_FRAC,
            "block_size": BLOCK_SIZE,
            "config_groups": config_groups,
            "ignore": ["lm_head"],
            "resolved_weight_args": resolved,
            "weight_observer": "memoryless_minmax (llm-compressor default for weights)",
            "pipeline": "sequential (one LlamaDecoderLayer per subgraph), propagate_error=True",
            "calibration": {"batch_size": 1, "shuffle": False, "num_calibration_samples": int(n_calib),
                            "max_seq_length": int(calib_seqlen), "calib_attention": "eager (forced by llm-compressor)"},
            "eval_attn_implementation": attn_impl,
            "model_dir": os.path.abspath(os.path.expanduser(a.model_dir)),
            "data": os.path.abspath(a.data),
        },
        "grid_check": grid,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: res[k] for k in ("scheme", "actorder", "ppl_fp32", "ppl_quant", "wall_s_compress")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
