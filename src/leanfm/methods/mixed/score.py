"""Per-layer, per-format sensitivity scores (AutoQuantize-style) and their on-disk cache.

The score of quantizing linear ``l`` (``y = x Wᵀ``) to format ``f`` is the loss increase of a
second-order Taylor expansion of the loss ``L`` in the layer's output, with the Hessian
approximated by the empirical Fisher's diagonal (``H ≈ E[g gᵀ]``, kept diagonal):

    ΔL(l, f) ≈ ½ Δyᵀ H Δy ≈ ½ Σ_tokens Σ_out-channels g² · Δy²,
    g = ∂L/∂y_l (of the unquantized model),  Δy = x_l (W_l − Q_f(W_l))ᵀ,

the sensitivity NVIDIA TensorRT Model Optimizer's AutoQuantize uses to choose per-layer formats
(``modelopt.torch.quantization.algorithms.AutoQuantizeSearcher``: the sum of
``grad_output² · (y_q − y)²``), here without the ½ (a constant). ``Q_f`` is leanfm's
round-to-nearest grid for the format (:func:`leanfm.methods.quantize.grid.rtn_quantize`),
whatever algorithm later quantizes the layer. ``L`` is the summed next-token cross-entropy of the
calibration ids, so scores add up over chunks. One forward + backward per calibration chunk
scores every layer and format at once: a forward hook keeps each target's input ``x``, a hook on
its output tensor receives ``g`` and adds the chunk's score; parameters need no gradients (only
the embedding output is made to require one).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize.grid import dequantize, rtn_quantize
from .decl import WeightFormat

SCORE_VERSION = 1  # bump when the score's definition changes: old cache entries are then ignored


def quant_error(w: torch.Tensor, fmt: WeightFormat, symmetric: bool) -> torch.Tensor:
    """``W − Q_f(W)`` on leanfm's round-to-nearest grid, fp32."""
    w = w.detach().float()
    qw = rtn_quantize(w, fmt.bits, fmt.group_size, symmetric)
    return w - dequantize(qw.codes, qw.scale, qw.zero, qw.group_size)


def output_error_scores(x: torch.Tensor, g: torch.Tensor, errors: list[torch.Tensor]) -> torch.Tensor:
    """``s_f = Σ_t Σ_o g[t, o]² · (x_t · E_f[o, :])²`` for each error matrix ``E_f [out, in]``.

    x: ``[tokens, in]`` layer inputs; g: ``[tokens, out]`` loss gradients at the layer's output.
    Returns float64 ``[len(errors)]``."""
    x = x.reshape(-1, x.shape[-1]).float()
    g2 = g.reshape(-1, g.shape[-1]).float().square()
    out = g2.shape[1]
    dy = x @ torch.cat(errors, dim=0).t()  # [T, F*out]: every format's output error in one GEMM
    dy = dy.view(x.shape[0], len(errors), out)
    return (dy.square_() * g2.unsqueeze(1)).sum(dim=(0, 2)).double()


def score_model(model: nn.Module, targets: dict[str, nn.Linear], cands: dict[str, list[WeightFormat]],
                symmetric: bool, ids: torch.Tensor, chunk_tokens: int = 1024) -> dict[str, dict[str, float]]:
    """``{layer: {format: score}}`` from one forward + backward per chunk of ``ids [n, seqlen]``."""
    acc = {n: torch.zeros(len(cands[n]), dtype=torch.float64) for n in targets}
    errs: dict[str, list[torch.Tensor]] = {}
    # keep each layer's error matrices across chunks while they fit in 2 GiB of fp32 (SmolLM2-135M
    # with 4 formats: 1.7 GB), else recompute them per chunk; RTN over every layer and format is
    # not cheap (measured on SmolLM2, 4 formats, 2 shared cores: ~70 s, more than a 512-token chunk)
    keep = sum(m.weight.numel() * len(cands[n]) for n, m in targets.items()) <= 1 << 29

    def errors(n: str) -> list[torch.Tensor]:
        if n in errs:
            return errs[n]
        e = [quant_error(targets[n].weight, f, symmetric) for f in cands[n]]
        if keep:
            errs[n] = e
        return e

    def on_forward(n: str):
        def hook(mod, args, out):
            if torch.is_tensor(out) and out.requires_grad:
                x = args[0].detach()

                def on_grad(g):
                    with torch.no_grad():
                        acc[n] += output_error_scores(x, g, errors(n))

                out.register_hook(on_grad)

        return hook

    def grad_from_here(mod, args, out):  # gradients start at the embedding output: no parameter needs one
        return out.detach().requires_grad_(True)

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(on_forward(n)) for n, m in targets.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(grad_from_here))
    rows = max(1, chunk_tokens // ids.shape[1])
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for s in range(0, ids.shape[0], rows):
                chunk = ids[s : s + rows]
                logits = model(input_ids=chunk, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return {n: {f.name: float(v) for f, v in zip(cands[n], acc[n].tolist())} for n in targets}


def cache_key(model: nn.Module, targets: dict[str, nn.Linear], formats: list[str], symmetric: bool, ids: torch.Tensor) -> str:
    """sha256 of everything a score depends on: every parameter's bytes (the gradients pass through
    the whole model, not only the targets), the target names, the formats, the grid's symmetry and
    the calibration ids."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": SCORE_VERSION, "targets": sorted(targets), "formats": list(formats),
                         "symmetric": bool(symmetric), "ids": list(ids.shape)}).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    h.update(ids.detach().to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    from ...models.cache import cache_root

    return cache_root() / "sensitivity"


def load_scores(key: str) -> dict | None:
    p = cache_dir() / f"{key}.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("version") == SCORE_VERSION and isinstance(data.get("scores"), dict) else None


def save_scores(key: str, data: dict) -> Path | None:
    """Write atomically (a temp file renamed into place); a cache that cannot be written is skipped."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"version": SCORE_VERSION, **data}, indent=1))
        tmp.replace(d / f"{key}.json")
        return d / f"{key}.json"
    except OSError:
        return None


def scores_for(model, targets, cands, symmetric, ids, formats) -> tuple[dict[str, dict[str, float]], bool, float, str]:
    """Cached scores when the key matches, else computed and stored: ``(scores, cached, seconds, key)``;
    seconds: spent here (hashing + loading, or scoring)."""
    t0 = time.perf_counter()
    key = cache_key(model, targets, formats, symmetric, ids)
    hit = load_scores(key)
    if hit is not None and set(hit["scores"]) == set(targets):
        return hit["scores"], True, time.perf_counter() - t0, key
    scores = score_model(model, targets, cands, symmetric, ids)
    secs = time.perf_counter() - t0
    save_scores(key, {"seconds": secs, "tokens": int(ids.numel()), "formats": list(formats), "symmetric": bool(symmetric),
                      "scores": scores})
    return scores, False, secs, key
