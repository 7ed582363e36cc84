"""``measure``: run the protocol's metric groups on one model and return metrics + details."""
from __future__ import annotations

import dataclasses

import torch

from ..data.calib import encode
from ..data.text import load_text
from ..errors import LeanfmError
from ..models.family import max_context, needs_bos
from . import memory as mem
from .cost import cost_metrics, load_profile
from .energy import EnergyMeter
from .flops import flops_per_token
from .protocol import Protocol
from .quality import evaluate, make_windows
from .bandwidth import roofline_metrics
from .speed import decode_benchmark


def with_settings(protocol: Protocol, settings: dict) -> Protocol:
    """``protocol`` with the keyword ``settings`` applied (unknown names refused)."""
    if not isinstance(protocol, Protocol):
        raise LeanfmError(f"protocol must be a leanfm.Protocol(...), got {type(protocol).__name__}")
    fields = [f.name for f in dataclasses.fields(Protocol)]
    bad = [k for k in settings if k not in fields]
    if bad:
        raise LeanfmError(f"unknown measurement setting '{bad[0]}'; leanfm.measure accepts: {', '.join(fields)}")
    if isinstance(settings.get("groups"), str):
        settings = {**settings, "groups": tuple(g.strip() for g in settings["groups"].split(",") if g.strip())}
    return dataclasses.replace(protocol, **settings)


def eval_ids(tok, protocol: Protocol) -> torch.Tensor:
    """The evaluation corpus tokenized once (reuse it across runs of one invocation)."""
    return encode(tok, load_text(protocol.dataset, protocol.split, protocol.data_dir))


def check_seqlen(model, protocol: Protocol) -> None:
    if "quality" in protocol.groups and protocol.seqlen > max_context(model):
        raise LeanfmError(f"--seqlen {protocol.seqlen} exceeds the model's context of {max_context(model)} tokens; lower --seqlen")


def _json_safe(obj):
    """Step infos as JSON data (tensors to lists, unknown objects to their repr)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def flags(model) -> dict:
    """``simulated`` and ``kernel`` from the steps applied to the model."""
    steps = getattr(model, "leanfm_info", {}).get("steps", [])
    kernels = [s["kernel"] for s in steps if s.get("kernel")]
    p = next(model.parameters(), None)
    dense = "torch-dense-" + {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(getattr(p, "dtype", None), "fp32") + (
        " (cuda)" if p is not None and p.is_cuda else "")
    return {
        "simulated": any(s.get("simulated") for s in steps),
        "kernel": kernels[-1] if kernels else dense,
    }


def speed_prompt(ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Real text as the prompt: ``batch`` different slices of the evaluation corpus."""
    need = protocol.batch * protocol.prompt
    reps = -(-need // ids.numel())
    src = ids.repeat(reps) if reps > 1 else ids
    return src[:need].view(protocol.batch, protocol.prompt)


def timed_metrics(model, sp: dict, protocol: Protocol, profile: dict, meter, weight_bytes: int | None = None) -> tuple[dict, dict]:
    """Metrics of the ``speed`` / ``energy`` groups from a timing result (:class:`.speed.DecodeTimer`,
    or :class:`.runtime_run.RuntimeTimer` with the runtime file's ``weight_bytes`` read per step)."""
    groups = set(protocol.groups)
    metrics, details = {}, {}
    context = protocol.prompt + (protocol.gen + 1) / 2
    if "speed" in groups:
        metrics.update(sp["metrics"])
        details.update(sp["details"])
        metrics["flops_per_token"] = flops_per_token(model, context)
        kv_mean = mem.tensor_bytes(sp["cache"]) * context / (protocol.prompt + protocol.gen)
        roof = roofline_metrics(model, metrics["decode_tokens_per_s"], protocol.batch, metrics["flops_per_token"], kv_mean, profile,
                                weight_bytes=weight_bytes)
        details["decode_bytes_per_step"] = roof.pop("decode_bytes_per_step", None)
        metrics.update(roof)
    if "energy" in groups:
        metrics.update(meter.metrics())
        metrics.update(cost_metrics(sp["metrics"]["decode_tokens_per_s"], metrics.get("energy_j_per_token"), profile))
    return metrics, details


def quality_group(scorer, model, tok, protocol: Protocol, ids: torch.Tensor, reference=None) -> tuple[dict, dict]:
    """The quality group: perplexity (and fidelity to ``reference``) of ``scorer`` — ``model``
    itself, or a runtime session running its export — on the protocol's windows; ``model``
    decides whether a window starts with BOS."""
    bos = tok.bos_token_id if needs_bos(model) else None
    if needs_bos(model) and bos is None:
        raise LeanfmError("this model needs a BOS token per window but its tokenizer defines none")
    windows = make_windows(ids, protocol.seqlen, protocol.max_eval_tokens, bos)
    fw = None if protocol.max_fidelity_tokens is None else max(1, protocol.max_fidelity_tokens // windows.shape[1])
    q = evaluate(scorer, windows, reference=reference, fidelity_windows=fw)
    details = {"eval_windows": q.pop("eval_windows"), "nll_per_token": q.pop("nll_per_token"), "bos_per_window": bos is not None}
    if "fidelity_tokens" in q:
        details["fidelity_tokens"] = q.pop("fidelity_tokens")
    return q, details


def measure(model, tok, protocol: Protocol | None = None, reference=None, profile: dict | None = None,
            ids: torch.Tensor | None = None, **settings) -> dict:
    """Measure ``model`` under ``protocol``; returns ``{"metrics", "details", "flags"}``.

    ``reference``: the unmodified model, for ``top1_agreement`` / ``kl_to_baseline``.
    ``ids``: the pre-tokenized evaluation corpus (else it is loaded and tokenized here).
    ``settings``: protocol fields set by keyword (``dataset="wikitext2"``, ``max_eval_tokens=4096``,
    ``groups=("quality",)``, ...), applied on top of ``protocol``.
    """
    protocol = with_settings(protocol or Protocol(), settings)
    protocol.validate()
    check_seqlen(model, protocol)
    profile = profile or load_profile()
    torch.set_num_threads(protocol.threads)
    ids = eval_ids(tok, protocol) if ids is None else ids
    groups = set(protocol.groups)
    metrics: dict = {}
    details: dict = {"protocol": protocol.to_dict(), "hardware_profile": profile.get("source"),
                     "steps": _json_safe(getattr(model, "leanfm_info", {}).get("steps", []))}

    timed = groups & {"speed", "energy"}
    if timed or "memory" in groups:
        meter = EnergyMeter(profile["power_w"])
        with mem.PeakRSS() as peak:  # memory alone needs one repeat: the peak and the cache are the same in each
            sp = decode_benchmark(model, speed_prompt(ids, protocol), protocol.gen, protocol.repeats if timed else 1,
                                  protocol.warmup if timed else 0, meter=meter, compile=protocol.compile and bool(timed))
        if "memory" in groups:
            metrics["kv_cache_bytes"] = mem.tensor_bytes(sp["cache"])
            metrics["peak_rss_bytes"] = peak.bytes
            details["peak_rss_scope"] = peak.scope
        if timed:
            m, d = timed_metrics(model, sp, protocol, profile, meter)
            metrics.update(m)
            details.update(d)
        del sp
    if "memory" in groups:
        metrics["weight_bytes"] = mem.weight_bytes(model)
        packed, fp32 = mem.quantized_linear_bytes(model)
        if fp32:
            details.update(quantized_linear_bytes=packed, quantized_linear_fp32_bytes=fp32, linear_bytes_ratio=packed / fp32)
        metrics["model_size_on_disk_bytes"] = mem.model_size_on_disk_bytes(model)
    if "quality" in groups:
        m, d = quality_group(model, model, tok, protocol, ids, reference)
        metrics.update(m)
        details.update(d)
    return {"metrics": metrics, "details": details, "flags": flags(model)}
