"""Distillation losses (pure tensor functions).

Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", eq. (2) and the remark
after it: with temperature T, the soft-target term is KL(p_T(teacher) ‖ p_T(student)) and its
gradient scales as 1/T², so it is multiplied by T² to keep its weight when T changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)), in nats.

    ``student_logits``, ``teacher_logits``: ``[..., vocab]`` (the same vocabulary); ``mask``:
    ``[...]`` of the tokens that count (None: all). The teacher gets no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary")
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    # KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), per token
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None:
        m = mask.to(kl.dtype)
        return t * t * (kl * m).sum() / m.sum().clamp_min(1)
    return t * t * kl.mean()


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the hidden states over the teacher's variance (scale-free: 1.0 for
    a student that outputs the teacher's mean, 0 for a perfect match)."""
    th = teacher_hidden.detach().float()
    return F.mse_loss(student_hidden.float(), th) / th.var().clamp_min(1e-12)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position predicting the next token (the last position scores nothing)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


HEAD_CHUNK = 32  # positions per LM-head call in chunked_next_token_loss (MeZO's loss)


@torch.no_grad()
def chunked_next_token_loss(model, ids: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """:func:`next_token_loss` without materializing the whole ``[batch, seq, vocab]`` logits: the
    decoder's last hidden states go through the LM head ``chunk`` positions at a time (forward
    only: what keeps MeZO at inference memory). Models whose head does more than one linear
    (Gemma's logit soft-capping) take the plain path."""
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(cfg, "final_logit_softcapping", None) is not None:
        return next_token_loss(model(ids, use_cache=False).logits, ids)
    hidden = model.base_model(ids, use_cache=False).last_hidden_state
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, ids.shape[1] - 1, chunk):
        j = min(i + chunk, ids.shape[1] - 1)
        logits = head(hidden[:, i:j]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, i + 1 : j + 1].reshape(-1), reduction="sum").double()
        count += logits.shape[0] * logits.shape[1]
    return (total / count).float()
