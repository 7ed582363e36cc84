"""Write a large Llama-shaped checkpoint with random weights, for the scale benchmark (issue 16).

    python benchmarks/make_large_checkpoint.py --shape 7b --out ~/.cache/leanfm/large/llama-7b-shaped
    python benchmarks/make_large_checkpoint.py --shape 1b --out ~/.cache/leanfm/large/llama-1b-shaped

No download: the architecture is Llama-2-7B's (hidden 4096, 32 layers, 32 heads, MLP 11008) or
Llama-3.2-1B's (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192), with SmolLM2-135M's
tokenizer (so real text tokenizes; the vocabulary is therefore 49,152, not 32,000/128,256: the
7B-shaped model has 6.88B parameters, 13.8 GB in bf16). Weights are drawn as transformers
initializes a Llama (normal, std ``initializer_range`` = 0.02; norms 1), in bf16, and written
tensor by tensor into ~2 GB shards with an index, so writing never holds more than one shard
(the script itself fits in ~3 GB). The output is what a user's downloaded checkpoint looks like:
sharded bf16 safetensors, ``config.json``, tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from leanfm.kernels.meta import skeleton
    from leanfm.models.cache import build_cache
    from leanfm.models.registry import ALIASES

    t0 = time.perf_counter()
    tok_dir = build_cache(ALIASES["smollm2-135m"])
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      initializer_range=0.02, torch_dtype="bfloat16", **SHAPES[a.shape])
    out = Path(os.path.expanduser(a.out))
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = skeleton(cfg)  # names and shapes only
    gen = torch.Generator().manual_seed(a.seed)
    seen, shard, shard_bytes, n_shard, weight_map, total = set(), {}, 0, 0, {}, 0
    names = []
    for name, p in model.named_parameters(remove_duplicate=True):
        names.append((name, tuple(p.shape)))

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if not shard:
            return
        n_shard += 1
        fname = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        print(f"  wrote {fname} ({shard_bytes / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
        shard, shard_bytes = {}, 0

    for name, shape in names:
        if name in seen:
            continue
        seen.add(name)
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, cfg.initializer_range, generator=gen).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= a.shard_gb * 1e9:
            flush()
    flush()
    # rename shards to the -of- convention transformers writes
    final = {}
    for i in range(1, n_shard + 1):
        src = tmp / f"model-{i:05d}.safetensors"
        dst = f"model-{i:05d}-of-{n_shard:05d}.safetensors"
        src.rename(tmp / dst)
        final[f"model-{i:05d}.safetensors"] = dst
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    params = total // 2
    print(f"{a.shape}-shaped Llama: {params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB bf16 in {n_shard} shards -> {out} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
