"""Perplexity (GPTQ protocol) and fidelity to a reference model on the same windows.

Protocol: the evaluation text is tokenized once; it is cut into non-overlapping windows of
``seqlen`` tokens (``seqlen - 1`` text tokens after a BOS where the model needs one); every
window is scored independently. Perplexity = exp(total token NLL / number of scored tokens).
Without BOS the first token of a window has no context and is not scored (``seqlen - 1`` per
window); with BOS all ``seqlen - 1`` text tokens are scored. ``eval_tokens`` is that count.

Fidelity (Bai et al.'s "loyalty"): on the same scored positions, ``top1_agreement`` is the share
where the argmax next token equals the reference's, and ``kl_to_baseline`` the mean
KL(p_reference || p_model) in nats per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import progress
from ..errors import LeanfmError


def make_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None) -> torch.Tensor:
    """``[n_windows, seqlen]`` input ids (BOS-prefixed when ``bos_id`` is given)."""
    text_len = seqlen - 1 if bos_id is not None else seqlen
    budget = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n = budget // text_len
    if n < 1:
        if max_tokens is not None and max_tokens < text_len:
            raise LeanfmError(
                f"--max-eval-tokens {max_tokens} is smaller than one evaluation window ({text_len} tokens at "
                f"--seqlen {seqlen}); raise it to at least {text_len} or lower --seqlen"
            )
        raise LeanfmError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {text_len}; lower --seqlen")
    w = ids[: n * text_len].view(n, text_len)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def _scored_logits(model, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at scored positions ``[T, V]`` and the target ids ``[T]`` for one window (``model``:
    a torch model, or a runtime session, :class:`leanfm.runtimes.base.RuntimeSession`)."""
    if hasattr(model, "window_logits"):  # the runtime's own forward (llama.cpp, ONNX Runtime, ...)
        logits = torch.from_numpy(model.window_logits(window.tolist())).float()
    else:
        logits = model(input_ids=window[None].to(getattr(model, "device", "cpu")), use_cache=False).logits[0].float().cpu()
    # Position i predicts token i+1. With a BOS prefix, every text token is a target.
    return logits[:-1], window[1:]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, fidelity_windows: int | None = None) -> dict:
    """Perplexity of ``model`` over ``windows``; with ``reference``, also fidelity metrics,
    computed on the first ``fidelity_windows`` windows (None = all of them)."""
    nll, count, agree, kl, fcount = 0.0, 0, 0, 0.0, 0
    nf = len(windows) if fidelity_windows is None else min(fidelity_windows, len(windows))
    with progress.bar("perplexity" + (" + fidelity" if reference is not None else ""), len(windows)) as adv:
        for wi, w in enumerate(windows):
            logits, target = _scored_logits(model, w)
            logp = F.log_softmax(logits, dim=-1)
            nll += -logp.gather(1, target[:, None]).sum().item()
            count += target.numel()
            if reference is not None and wi < nf:
                fcount += target.numel()
                ref_logits, _ = _scored_logits(reference, w)
                ref_logp = F.log_softmax(ref_logits, dim=-1)
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
                kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                del ref_logits, ref_logp
            del logits, logp
            adv()
    out = {"perplexity": math.exp(nll / count), "eval_tokens": count, "eval_windows": len(windows), "nll_per_token": nll / count}
    if reference is not None:
        out["top1_agreement"] = agree / fcount
        out["kl_to_baseline"] = max(kl / fcount, 0.0)
        out["fidelity_tokens"] = fcount
    return out
