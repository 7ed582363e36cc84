"""Assemble the prediction dict: totals, baseline comparison, the speed-up verdict, assumptions."""
from __future__ import annotations

from .analyzer import BATCHES, DEFAULT_ACCEPTANCE, GB, expected_tokens

_KIND = {"w4a16": "int4 weight-only", "w8a16": "int8 weight-only", "w8a8": "int8 weight+activation", "fp8": "fp8",
         "2:4-sparse": "2:4 sparse", "unstructured-sparse": "sparse (CSR)"}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _reason(cur, base, step, bstep, d: float, p: float) -> str:
    eff, tgt, hw = cur.eff, cur.tgt, cur.tgt.name
    if not eff.steps:
        return "baseline recipe: nothing to speed up"
    fmts = cur.plan.formats()
    real = {f.name: f for f in fmts if not f.simulated and f.name != tgt.dtype}
    sim = {f.wanted: f for f in fmts if f.simulated}
    parts = []
    slow = [f for f in real.values() if f.slower_than_dense]
    if slow:
        parts.append(", ".join(f"{_KIND.get(f.name, f.name)} kernel ({f.backend})" for f in slow)
                     + f" on {hw} is slower than dense there (measured, kernels.yaml)")
    elif real:
        kernels = ", ".join(f"{_KIND.get(n, n)} kernel ({f.backend})" for n, f in real.items())
        if step.bound == "memory":
            parts.append(f"{kernels} on {hw}; decode is memory-bound: {_ratio(bstep.bytes, step.bytes):.1f}x fewer bytes")
        else:
            parts.append(f"{kernels} on {hw}; decode is compute-bound: {_ratio(bstep.flops, step.flops):.1f}x fewer FLOPs")
    a, b = cur.plan.arch, base.plan.arch
    shrink = [w for w, on in ((f"layerdrop ({a.layers} of {b.layers} layers)", eff.drop),
                              (f"width pruning (MLP {a.intermediate}/{b.intermediate}, KV heads {a.kv_heads}/{b.kv_heads})", eff.width),
                              ("low rank", any(pc.name.endswith(".a") for layer in cur.plan.layers for _, pc, _ in layer))) if on]
    if shrink:
        parts.append(f"{' + '.join(shrink)}: {_ratio(bstep.flops, step.flops):.2f}x fewer FLOPs per decode step")
    if eff.kv is not None:
        cap = f"{eff.kv.budget} tokens" if eff.kv.budget else f"{eff.kv.bits}-bit codes"
        parts.append(f"{eff.kv.method} keeps the KV cache at {cap}")
    if cur.spec:
        e = expected_tokens(cur.alpha, cur.spec.k)
        parts.append(f"speculative (draft {cur.spec.draft}, k={cur.spec.k}, acceptance {cur.alpha:g}): {e:.2f} tokens per round")
    for f in sim.values():
        hint = ""
        k24 = tgt.kernels("2:4-sparse") if f.wanted.startswith("2:4") and "masked" in f.wanted else None
        if k24 and k24.get("faster_than_dense", True) and k24.get("backends"):
            hint = f" ({hw} has a 2:4 kernel, {k24['backends'][0]}, for weights stored compressed)"
        parts.append(f.note + hint)
    if eff.unmodelled and not parts:
        parts.append(eff.unmodelled[0])
    return f"{'; '.join(parts) or 'no modelled effect on speed'}; decode {d:.2f}x, prefill {p:.2f}x"


def _assumptions(cur, context: float, acceptance) -> list[str]:
    tgt, eff, a = cur.tgt, cur.eff, cur.plan.arch
    out = [f"dense weights, activations and KV cache in {tgt.dtype} (the {tgt.name} profile's default dtype); "
           f"baseline = the same model unmodified in {tgt.dtype}",
           f"decode step priced at the mean context prompt + (gen + 1) / 2 = {context:g} keys (as measure/flops.py)"]
    seen = set()
    for f in cur.plan.formats():
        key = (f.name, f.backend, f.simulated)
        if key in seen:
            continue
        seen.add(key)
        if f.simulated:
            out.append(f"simulated: {f.note}")
        elif f.name != tgt.dtype:
            out.append(f"{f.name} on {f.backend or 'a kernel'} (compute {f.compute_dtype}, overhead +{f.overhead:.0%}): {f.note}".rstrip(": "))
    if any(pc.quant is not None and pc.quant.act_bits and f.name != "w8a8" for layer in cur.plan.layers for _, pc, f in layer):
        out.append(f"no int8 x int8 kernel used on {tgt.name}: activation quantization simulated (weight-only int8 speed)")
    out.append("attention fused (FlashAttention-style): the score matrix is not written to memory; RoPE, softmax, SiLU, "
               "residual adds and the embedding lookup are not priced")
    out.append("prefill computes logits for the last position only (generate's logits_to_keep=1)")
    if tgt.per_step_us or tgt.per_layer_us or tgt.per_op_us:
        out.append(f"fixed framework overhead per forward from the profile: {tgt.per_step_us:.0f} us per step + "
                   f"{tgt.per_layer_us:.0f} us per layer + {tgt.per_op_us:.1f} us per matmul beyond a dense layer's")
    else:
        out.append(f"no fixed framework overhead (the {tgt.name} profile has none): small models and small batches run slower than this")
    if eff.drop:
        out.append("layerdrop: dropped layers assumed evenly spread (the real choice depends on calibration)")
    if eff.kv is not None:
        out.append(f"KV policy {eff.kv.method} applies to full-attention layers; sliding-window layers keep the model's own cache")
    if cur.spec:
        src = "given" if acceptance is not None else f"ASSUMED (default {DEFAULT_ACCEPTANCE}; pass --acceptance-rate)"
        out.append(f"speculative decoding: acceptance rate {cur.alpha:g} {src}; rows of a batch advance in lockstep")
    out += eff.unmodelled
    out.append("memory in GB of 1e9 bytes; activations estimated for the prefill (largest per-layer intermediates + fp32 "
               "last-position logits); allocator and framework memory not counted")
    if a.sliding_window and any(t == "sliding" for t in a.layer_types):
        out.append(f"{a.layer_types.count('sliding')} of {a.layers} layers use a {a.sliding_window}-token sliding window")
    return out


def _formats(cur) -> list[dict]:
    """Each distinct way a matmul runs, with how many matmuls run that way."""
    seen: dict[tuple, dict] = {}
    for f in cur.plan.formats():
        key = (f.name, f.backend, f.simulated, f.note)
        row = seen.setdefault(key, {"format": f.name, "wanted": f.wanted or f.name, "backend": f.backend, "compute_dtype": f.compute_dtype,
                                    "simulated": f.simulated, "matmuls": 0, "note": f.note})
        row["matmuls"] += 1
    return list(seen.values())


def _clean(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r["intensity"] == float("inf"):
            r["intensity"] = None
    return rows


def assemble(cur, base, batch: int, prompt: int, gen: int, acceptance) -> dict:
    tgt, prof, a = cur.tgt, cur.tgt.profile, cur.plan.arch
    context = prompt + (gen + 1) / 2
    pre, step = cur.prefill(batch, prompt), cur.step(batch, context, prompt)
    tpot_s, spec = cur.tpot(batch, context, prompt)
    bpre, bstep = base.prefill(batch, prompt), base.step(batch, context, prompt)
    btpot_s, _ = base.tpot(batch, context, prompt)
    mem = cur.memory(batch, prompt, gen)
    tok_s = batch / tpot_s
    energy = float(prof["power_w"]) * tpot_s / batch
    curve = []
    for b in BATCHES:
        m = cur.memory(b, prompt, gen)
        t, _ = cur.tpot(b, context, prompt)
        curve.append({"batch": b, "decode_tokens_per_s": b / t, "tpot_ms": t * 1e3, "fits": m["fits"],
                      "memory_total_bytes": m["memory_total_bytes"], "bound": cur.step(b, context, prompt).bound})
        if not m["fits"]:
            break
    d, p = btpot_s / tpot_s, bpre.seconds / pre.seconds
    out = {
        "model": a.name, "model_source": a.source, "recipe": cur.eff.recipe, "steps": cur.eff.steps,
        "hardware": tgt.name, "hardware_source": prof.get("source", "<profile dict>"), "dtype": tgt.dtype,
        "batch": batch, "prompt": prompt, "gen": gen, "context": context,
        "architecture": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                         "intermediate": a.intermediate, "vocab": a.vocab, "tie_word_embeddings": a.tie, "params": a.params()},
        "prefill_ms": pre.seconds * 1e3, "decode_step_ms": step.seconds * 1e3, "tpot_ms": tpot_s * 1e3,
        "decode_tokens_per_s": tok_s, "flops_per_token": step.flops / batch, "prefill_flops": pre.flops,
        "decode_bytes_per_step": step.bytes,
        **mem, "memory_gb": prof["memory_gb"],
        "energy_j_per_token": energy, "usd_per_million_tokens": float(prof["usd_per_hour"]) / 3600.0 / tok_s * 1e6,
        "co2_g_per_million_tokens": energy * 1e6 / 3.6e6 * float(prof["grid_gco2_per_kwh"]),
        "bound": {"decode": step.bound, "prefill": pre.bound},
        "overhead_share": {"decode": step.overhead_seconds / step.seconds, "prefill": pre.overhead_seconds / pre.seconds},
        "simulated": any(f.simulated for f in cur.plan.formats()),
        "formats": _formats(cur),
        "speculative": spec or None,
        "throughput_vs_batch": curve,
        "baseline": {"prefill_ms": bpre.seconds * 1e3, "tpot_ms": btpot_s * 1e3, "decode_tokens_per_s": batch / btpot_s,
                     "decode_bytes_per_step": bstep.bytes, "weight_bytes": base.memory(batch, prompt, gen)["weight_bytes"]},
        "speedup_vs_baseline": {"decode": d, "prefill": p},
        "will_speed_up": d > 1.01,
        "will_speed_up_reason": _reason(cur, base, step, bstep, d, p),
        "hardware_requested": prof.get("requested"),
        "assumptions": _assumptions(cur, context, acceptance),
        "per_layer": {"prefill": _clean(pre.rows), "decode": _clean(step.rows)},
    }
    out["fits_text"] = (f"fits on one {tgt.name} ({prof['memory_gb']:g} GB)" if mem["fits"]
                        else f"does NOT fit on one {tgt.name} ({prof['memory_gb']:g} GB): needs {mem['memory_total_bytes'] / GB:.1f} GB")
    out["no_verdict_reason"] = None
    if not mem["fits"]:
        _no_fit(out, tgt.name, prof["memory_gb"], mem["memory_total_bytes"])
    else:
        bmem = base.memory(batch, prompt, gen)
        if not bmem["fits"]:
            out["will_speed_up_reason"] += (f"; the uncompressed baseline itself does NOT fit ({bmem['memory_total_bytes'] / GB:.1f} GB "
                                            f"on {prof['memory_gb']:g} GB): the speed-up is against a baseline that could not run here")
    return out


# Keys a prediction that does not fit in memory leaves empty (present, null): no cost without a run.
NO_FIT_NULLS = ("will_speed_up", "energy_j_per_token", "usd_per_million_tokens", "co2_g_per_million_tokens")


def no_fit_message(hardware: str, memory_gb: float, needed_bytes: float) -> str:
    return (f"does NOT fit: needs {needed_bytes / GB:.1f} GB, {hardware} has {memory_gb:g} GB — no speed verdict or cost; "
            "use a smaller model, a lower-bit recipe, or hardware with more memory")


def _no_fit(out: dict, hardware: str, memory_gb: float, needed: float) -> None:
    """A setup that does not fit in memory cannot run: no verdict, no energy, money or CO2 per token
    (the keys stay, as null, with the reason in ``will_speed_up_reason`` and ``no_verdict_reason``).
    Times and the speed-up ratios stay as the roofline's what-if numbers."""
    msg = no_fit_message(hardware, memory_gb, needed)
    for key in NO_FIT_NULLS:
        out[key] = None
    out["will_speed_up_reason"] = msg
    out["no_verdict_reason"] = msg
