"""GGUF export fidelity: llama.cpp's logits on leanfm's export vs leanfm's torch forward of the
same weights (perplexity, top-1 agreement, max logit difference).

    python benchmarks/gguf_fidelity.py [--tokens 256] [--threads 2]

Needs llama-cpp-python (``pip install llama-cpp-python==0.3.36``, compiled from source) and the
embedded model; WikiText-2 test from $LEANFM_DATA_DIR or the default data folder.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import leanfm
from leanfm.data.text import load_text
from leanfm.models.gguf_export import export_gguf
from leanfm.models.packaged import gguf_path
from leanfm.models.registry import ALIASES

CASES = [  # (label, recipe step or None, GGUF type, type for tensors leanfm left in float)
    ("f32", None, "f32", "f32"),
    ("rtn w4 g32 sym, Q4_0, float tensors requantized", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0", "q4_0"),
    ("rtn w4 g32 sym, Q4_0, float tensors f32", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0", "f32"),
]


def nll(logits: np.ndarray, ids: list[int]) -> float:
    lg = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return float((lse - lg[np.arange(len(lg)), ids[1:]]).mean())


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, tokens {a.tokens}, llama-cpp-python {llama_cpp.__version__}")
    with tempfile.TemporaryDirectory() as d:
        src = gguf_path(ALIASES["smollm2-135m"], Path(d))
        print("| export | file MB | ppl torch | ppl llama.cpp | top-1 agreement | max abs logit diff |\n|---|---|---|---|---|---|")
        for label, step, qtype, ftype in CASES:
            m, tok = leanfm.load("smollm2-135m")
            if step:
                leanfm.apply_(m, step)
            path = export_gguf(m, tok, Path(d) / "m.gguf", qtype, source_gguf=src, float_type=ftype)
            ids = tok(load_text("wikitext2"), add_special_tokens=False)["input_ids"][: a.tokens]
            with torch.no_grad():
                ref = m(torch.tensor([ids])).logits[0].numpy()
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, a.tokens), logits_all=True, n_threads=a.threads, verbose=False)
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            print(f"| {label} | {path.stat().st_size / 1e6:.1f} | {np.exp(nll(ref, ids)):.3f} | {np.exp(nll(got, ids)):.3f} | "
                  f"{(got.argmax(-1) == ref.argmax(-1)).mean():.3f} | {np.abs(got - ref).max():.3g} |", flush=True)
            del llm


if __name__ == "__main__":
    main()
