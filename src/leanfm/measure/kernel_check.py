"""Decode-kernel self-check: the packed decode path must agree with the reference path of the
same weights.

Packed backends (``kernels/backends.py``) run an integer kernel only for decode-sized inputs (at
most ``DECODE_MAX_TOKENS`` rows: tinygemm int4, int8pack, leanfm's C++ int4 GEMV); larger inputs
dequantize the packed codes to fp32 and run a dense GEMM. Perplexity uses full-sequence forwards,
so it only sees the dense path: a decode kernel that reads the packed layout wrongly still gets a
good perplexity while the model decodes garbage, and its speed would be reported as real.

:func:`check_decode_kernel` greedy-decodes a few tokens per prompt one at a time with a plain
KV cache (every step feeds one token, so the decode kernels run) and compares each step's logits
with one teacher-forced forward over prompt + decoded tokens without a cache (more than
``DECODE_MAX_TOKENS`` rows: the dequant + dense path). Teacher forcing means a legitimate
near-tie broken differently by the int kernels' bf16 rounding does not derail later steps.

The check bypasses the model's KV-cache policy (``model.leanfm_kv_policy``: a fresh plain
``DynamicCache`` is passed, and the score hooks of H2O / SnapKV do nothing for it) and its decoding
policy (``model.leanfm_decoder``: the model's own forward is called, never ``policy.generate``);
those change outputs on purpose and are measured elsewhere.

What has a decode/prefill split: only the packed ``QuantLinear`` backends other than
``reference`` (whose forward is dequant + dense GEMM at every size), fused groups included.
``SparseLinear`` (CSR) runs the same ``torch.sparse.mm`` over the same CSR tensors for any number
of rows, ``LowRankLinear`` two dense GEMMs, and SmoothQuant's ``ActQuant`` fake-quantizes
activations per token (each row its own dynamic scale, so one token alone gets the same scale
as inside a full sequence) in front of an ordinary packed layer: nothing else to check.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..errors import LeanfmError
from ..kernels import backends as B
from ..kernels.checkpoint import kernel_summary, quantized_layers

# A step is a hard mismatch when the decoded token is not the reference argmax AND the reference
# prefers its own argmax by more than TOLERANCE logits (ref.max() - ref[decoded], the same number
# in nats of log-probability: 3 means the reference gives the decoded token under e^-3 = 5% of
# its top token's probability). Measured on SmolLM2-135M (AVX2 CPU, torch 2.13), 3 WikiText-2
# prompts of 32 tokens, gen 8 and 16:
# - correct kernels: cpp-int4 (rtn-w4g64, gptq-w4g64, awq-w4g64, int4-fast) differs from the
#   reference by 1e-4 logits; tinygemm-int4 (bf16 activations) by up to 0.76 and int8pack (rtn-w8)
#   by up to 0.84 at some vocabulary entry; smoothquant-w8a8 (int8pack + per-token int8
#   activations, whose rounding amplifies that noise) by up to 2.47. The decoded token differed
#   only on near-ties: largest reference gap of a disagreement 0.43 (smoothquant; tinygemm 0.03),
#   and the largest gap the noise could have flipped at any step (max over tokens of
#   (dec - ref)[t] - (dec - ref)[argmax ref]) was 2.09 (smoothquant), 0.52 (int8pack).
# - deliberately corrupted layouts (rows of every packed weight rolled by one, nibbles swapped,
#   or only the MLP down projections rolled; int8pack, tinygemm-int4, cpp-int4): token agreement
#   0 in every run, median gap ~10, at least 20 of 24 steps (gen 8) above 5 logits.
# 3.0 is 1.4x the largest legitimately flippable gap and 7x the largest flip seen, while a broken
# layout still gives ~20 hard mismatches where one suffices.
TOLERANCE = 3.0


def _split_backend(be: B.Backend) -> bool:
    """Whether a backend runs its own kernel for some inputs (anything but dequant + dense GEMM)."""
    return type(be).forward is not B.Backend.forward


def _kernel_backends(model: nn.Module) -> dict[str, int]:
    """Backends with a decode/prefill split, by name -> number of packed layers on them."""
    used: dict[str, int] = {}
    for q in quantized_layers(model).values():
        if _split_backend(q.backend):
            used[q.backend.name] = used.get(q.backend.name, 0) + 1
    return used


def needs_decode_check(model: nn.Module) -> bool:
    """True when some packed layer runs a decode kernel that differs from its prefill path (a
    ``QuantLinear`` or fused group on any backend but ``reference``). CSR sparse, low-rank and
    dense layers have one path for every input size, and ``reference`` dequantizes at every size."""
    return bool(_kernel_backends(model))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _plain_cache(model: nn.Module):
    """A fresh plain ``DynamicCache``: never the model's KV policy (``kvcache.policies.make_cache``)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=model.config)


def _collect(model: nn.Module, prompts: torch.Tensor, gen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-path and reference-path logits of the same positions, both ``[P, gen, V]`` fp32.

    One batched prefill over all prompts fills a fresh plain cache (dense path); each prompt then
    decodes alone (batch 1, as ``leanfm bench`` times by default) from its own copy of that cache:
    ``gen`` steps of one token, the first fed token being the prefill's argmax, step ``i`` feeding
    position ``L + i``. One teacher-forced forward over all prompts + their fed tokens without a
    cache gives the reference logits of those positions."""
    n_prompts, length = prompts.shape
    cache = _plain_cache(model)
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1, keepdim=True)  # [P, 1]
    fed, dec = [], []
    for p in range(n_prompts):
        own = copy.deepcopy(cache) if n_prompts > 1 else cache
        if n_prompts > 1:
            own.batch_select_indices(torch.tensor([p], device=prompts.device))
        nxt, toks, steps = first[p : p + 1], [], []
        for _ in range(gen):
            toks.append(nxt)
            step = model(input_ids=nxt, past_key_values=own, use_cache=True).logits[0, -1].float()
            steps.append(step)
            nxt = step.argmax().view(1, 1)
        fed.append(torch.cat(toks, dim=1))
        dec.append(torch.stack(steps))
    # no logits_to_keep: the LM head (packed in some recipes) must see > DECODE_MAX_TOKENS rows too
    ref = model(input_ids=torch.cat([prompts, torch.cat(fed)], dim=1), use_cache=False).logits[:, length:].float()
    return torch.stack(dec), ref


def check_decode_kernel(model: nn.Module, prompts: torch.Tensor, gen: int = 8, tolerance: float = TOLERANCE) -> dict:
    """Compare ``gen`` single-token decode steps per prompt with the reference (prefill) path.

    ``prompts``: ``[P, L]`` token ids of real text (``L + gen`` must exceed ``DECODE_MAX_TOKENS``
    so the teacher-forced forward takes the dequant + dense path in every layer). Returns a
    JSON-safe summary; raises :class:`LeanfmError` (one line) on any hard mismatch: a decoded
    token the reference ranks more than ``tolerance`` logits below its own argmax.
    """
    t0 = time.perf_counter()
    if prompts.dim() == 1:
        prompts = prompts.unsqueeze(0)
    n_prompts, length = prompts.shape
    if gen < 1 or length < 1:
        raise LeanfmError(f"the decode-kernel check needs at least one prompt token and gen >= 1 (got L={length}, gen={gen})")
    if length + gen <= B.DECODE_MAX_TOKENS:
        raise LeanfmError(f"the decode-kernel check needs prompt + gen > {B.DECODE_MAX_TOKENS} tokens so that its reference "
                          f"forward takes the dense path; got {length} + {gen}")
    prompts = prompts.to(_device(model))
    used = _kernel_backends(model)
    with torch.no_grad():
        dec, ref = _collect(model, prompts, gen)
        dec, ref = dec.reshape(-1, dec.shape[-1]), ref.reshape(-1, ref.shape[-1])  # [P * gen, V], prompt-major
        tok, best = dec.argmax(-1), ref.argmax(-1)
        gap = ref.gather(1, best[:, None])[:, 0] - ref.gather(1, tok[:, None])[:, 0]  # 0 where they agree
        diff = (dec - ref).abs().amax(-1)
        rel = diff / ref.abs().amax(-1).clamp(min=1e-12)
    differ = (tok != best).nonzero()[:, 0].tolist()
    hard = [i for i in differ if float(gap[i]) > tolerance]
    checked = tok.numel()
    max_abs = float(diff.max())
    summary = kernel_summary(model)
    result = {
        "prompts": n_prompts, "prompt_tokens": length, "gen": gen, "tokens_checked": checked,
        "token_agreement": 1 - len(differ) / checked, "hard_mismatches": len(hard),
        "disagreement_gaps": sorted(round(float(gap[i]), 4) for i in differ),
        "max_abs_logit_diff": max_abs, "max_rel_logit_diff": float(rel.max()), "tolerance": tolerance,
        "backends": used, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel": summary or "no packed layers", "seconds": time.perf_counter() - t0,
    }
    if hard:
        i = hard[0]
        p, s, got, want, g = i // gen, i % gen, int(tok[i]), int(best[i]), float(gap[i])
        names = ", ".join(used) or "the packed kernels"
        raise LeanfmError(
            f"decode-kernel check failed: {names} ({torch.backends.cpu.get_cpu_capability()}) decoded {len(hard)} of {checked} "
            f"tokens differently from the reference path of the same weights (first: prompt {p}, step {s}: decoded token {got}, "
            f"reference {want}, which the reference prefers by {g:.3g} logits > tolerance {tolerance}; max logit difference "
            f"{max_abs:.3g}): on this machine the decode kernel does not compute what its packed weights hold (e.g. it reads "
            f"their layout wrongly), so its output is wrong and its speed would not be real; "
            f"run with backend: reference, or report this CPU (see /proc/cpuinfo flags) and torch {torch.__version__}"
        )
    return result
