"""Roofline timing of one forward pass, op by op (pure arithmetic on shapes and formats).

Every op (a matmul, the two attention products, a norm) is priced with the roofline model
(Williams, Waterman & Patterson 2009, "Roofline: an insightful visual performance model"):

    t_op = max(flops x flops_factor / peak(compute_dtype), bytes / bandwidth) x (1 + overhead)

``flops_factor`` and ``overhead`` (unpacking, scales, index decoding) come from the op's kernel in
``hardware/kernels.yaml``. The op is *memory-bound* when the bandwidth term is the larger one;
its arithmetic intensity is flops / bytes. A forward adds the profile's fixed framework costs when
it has them (calibrated on ``local``): ``overhead_us_per_model_step`` once,
``overhead_us_per_layer`` per decoder layer, ``overhead_us_per_op`` per matmul beyond a dense
layer's (low-rank factors). A calibrated profile also carries measured curves (``curves.py``): a
matmul's weight read then runs at the bandwidth measured for its row length and size, and its
fp32 compute at the rate measured for its number of rows.

FLOPs (multiply-add = 2): a linear ``in -> out`` costs ``2 x in x out`` per token; attention
costs ``2 x heads x head_dim x keys`` for Q K^T and the same for A V per query (Kaplan et al.
2020, "Scaling Laws for Neural Language Models", Table 1: 2N + 2 n_layer n_ctx d_attn per token);
a query at causal position j sees ``min(stored + j, window)`` keys. An RMSNorm costs ~4 x hidden
per token. Bytes: the weights once per forward (shared by the batch), activations in and out of
each op at the dense dtype, and the KV cache read by attention (fused attention: the score
matrix never reaches memory, FlashAttention, Dao et al. 2022).

A step measured by ``leanfm bench`` is set against the same bound with the profile's flat rates
(:func:`measured_step`: ``achieved_gbps`` and ``roofline_fraction``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .arch import Arch
from .formats import Format
from .kvcache import per_token_bytes, stored_tokens
from .recipe_effects import KVSpec, Piece


@dataclass
class Target:
    """The hardware facts a forward needs (built by :func:`leanfm.predict.analyzer.target`)."""

    profile: dict
    dtype: str  # dense weights, activations and KV cache
    elem_bytes: float
    bandwidth: float  # bytes/s
    peak: object  # dtype -> FLOP/s
    kernels: object  # format -> kernels.yaml entry or None
    per_step_us: float = 0.0
    per_layer_us: float = 0.0
    per_op_us: float = 0.0
    gemv_seconds: object = None  # (weight bytes, in_features) -> seconds of a one-row matmul (calibrated), or None
    gemm_rate: object = None  # rows -> fp32 matmul FLOP/s (calibrated curve), or None
    gemm_slowdown: object = None  # rows -> time of a dense matmul of that many rows over its one-row GEMV, from DRAM (calibrated), or None
    elementwise: str = "fused"  # "unfused": eager PyTorch (each elementwise op reads and writes memory)

    @property
    def name(self) -> str:
        return str(self.profile["name"])


@dataclass
class Plan:
    """A compressed model ready to price: shapes, and each matmul's format on the target."""

    arch: Arch
    layers: list[list[tuple[str, Piece, Format]]]  # per decoder layer: (linear short name, piece, format)
    head: list[tuple[Piece, Format]]
    kv: KVSpec | None
    embed_bytes: float
    norm_bytes: float

    def formats(self) -> list[Format]:
        return [f for layer in self.layers for _, _, f in layer] + [f for _, f in self.head]


@dataclass
class Forward:
    """Priced forward pass: op rows and totals."""

    rows: list[dict] = field(default_factory=list)  # one per op per distinct layer kind
    seconds: float = 0.0
    roofline_seconds: float = 0.0
    overhead_seconds: float = 0.0
    flops: float = 0.0  # matmul + attention (norms excluded, as measure/flops.py)
    bytes: float = 0.0
    compute_bound_seconds: float = 0.0

    @property
    def bound(self) -> str:
        return "compute" if self.compute_bound_seconds > self.roofline_seconds / 2 else "memory"


def op_row(tgt: Target, op: str, kind: str, fmt: str, flops: float, w_bytes: float, a_bytes: float, kv_bytes: float,
           compute_dtype: str, overhead: float = 0.0, flops_factor: float = 1.0, rows: int | None = None,
           in_features: int | None = None) -> dict:
    """One op priced on the roofline (see the module docstring for the equation). ``rows``: the
    tokens a matmul multiplies at once; with a calibrated profile a matmul's weight read costs the
    measured GEMV time for that many bytes and its fp32 compute runs at the measured rate for
    that many rows (``curves.py``), instead of the flat peak and bandwidth; a dense matmul of
    several rows reads them ``gemm_slowdown(rows)`` times slower than the one-row GEMV."""
    total = w_bytes + a_bytes + kv_bytes
    peak = tgt.gemm_rate(rows) if rows and tgt.gemm_rate and compute_dtype == "fp32" else tgt.peak(compute_dtype)
    t_compute = flops * flops_factor / peak
    if rows and tgt.gemv_seconds and w_bytes and in_features:
        t_memory = tgt.gemv_seconds(w_bytes, in_features) + (a_bytes + kv_bytes) / tgt.bandwidth
        if rows > 1 and tgt.gemm_slowdown and fmt == tgt.dtype:  # a dense batched matmul streams its weights slower
            t_memory *= tgt.gemm_slowdown(rows)
    else:
        t_memory = total / tgt.bandwidth
    t = max(t_compute, t_memory) * (1.0 + overhead)
    return {"op": op, "kind": kind, "format": fmt, "flops": flops * flops_factor, "weight_bytes": w_bytes, "act_bytes": a_bytes,
            "kv_bytes": kv_bytes, "bytes": total, "intensity": flops * flops_factor / total if total else float("inf"),
            "bound": "compute" if t_compute > t_memory else "memory", "time_ms": t * 1e3}


def _keys_sum(stored: float, n: int, cap: float | None) -> float:
    """Sum over queries j = 1..n of min(stored + j, cap): keys each new query attends to."""
    if cap is None:
        return n * stored + n * (n + 1) / 2
    m = max(0.0, min(float(n), cap - stored))
    return m * stored + m * (m + 1) / 2 + (n - m) * cap


def _matmul(tgt: Target, name: str, pc: Piece, f: Format, rows: int) -> dict:
    flops = 2.0 * pc.in_features * pc.out_features * rows
    act = rows * (pc.in_features + pc.out_features) * tgt.elem_bytes
    return op_row(tgt, name, "matmul", f.name, flops, f.read_bytes, act, 0.0, f.compute_dtype, f.overhead, f.flops_factor, rows,
                  pc.in_features)


def _norm(tgt: Target, name: str, hidden: int, rows: int) -> dict:
    return op_row(tgt, name, "norm", tgt.dtype, 4.0 * hidden * rows, hidden * tgt.elem_bytes, 2.0 * rows * hidden * tgt.elem_bytes,
                  0.0, tgt.dtype)


def _elementwise(tgt: Target, a: Arch, rows: int) -> dict:
    """Memory traffic of a layer's elementwise ops (no weights, no FLOPs counted), per token:
    unfused (eager PyTorch, as ``leanfm bench`` runs on CPU): RoPE on q and k ~9 element passes
    each (rotate-half copy, two products, a sum), two residual adds (read 2, write 1), SiLU(gate)
    then x up (read 1 + write 1, read 2 + write 1); fused (serving stacks: SiLU-and-mul in one pass,
    adds in the norms, RoPE in attention): only the SiLU-and-mul pass, read 2 x I, write I."""
    if tgt.elementwise == "unfused":
        elems = 9 * (a.heads + a.kv_heads) * a.head_dim + 6 * a.hidden + 5 * a.intermediate
    else:
        elems = 3 * a.intermediate
    return op_row(tgt, "elementwise", "elementwise", tgt.dtype, 0.0, 0.0, rows * elems * tgt.elem_bytes, 0.0, tgt.dtype)


def _short(i: int, short: str, pc: Piece) -> str:
    """``q_proj``, or ``q_proj.a`` / ``q_proj.b`` for low-rank factors."""
    return short + pc.name[len(Arch.module_name(i, short)):]


def _layer_rows(plan: Plan, tgt: Target, i: int, batch: int, n: int, past: float, prompt: float | None) -> list[dict]:
    a, rows = plan.arch, batch * n
    norms = ["input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm"][: a.norms_per_layer]
    out = [_norm(tgt, norms[0], a.hidden, rows)]
    attn = [(s, pc, f) for s, pc, f in plan.layers[i] if s in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [(s, pc, f) for s, pc, f in plan.layers[i] if s not in ("q_proj", "k_proj", "v_proj", "o_proj")]
    out += [_matmul(tgt, _short(i, s, pc), pc, f, rows) for s, pc, f in attn if s != "o_proj"]
    # attention: a query at causal position j sees min(stored + j, window) keys
    stored = stored_tokens(a, plan.kv, i, past, prompt)
    window = a.kv_window(i)
    keys = _keys_sum(stored, n, None if window is None else window + 1)
    kv_tok = per_token_bytes(a, plan.kv, i, tgt.elem_bytes) * batch * (stored + n)
    q_bytes = rows * a.heads * a.head_dim * tgt.elem_bytes
    flops = 2.0 * a.heads * a.head_dim * keys * batch
    out.append(op_row(tgt, "attn_qk", "attention", tgt.dtype, flops, 0.0, q_bytes, kv_tok / 2, tgt.dtype))
    out.append(op_row(tgt, "attn_av", "attention", tgt.dtype, flops, 0.0, q_bytes, kv_tok / 2, tgt.dtype))
    if tgt.elementwise == "unfused":
        # eager transformers' DynamicCache appends by torch.cat: every step reads the layer's whole
        # cache and writes it back one token longer (a serving stack writes only the new token)
        out.append(op_row(tgt, "kv_append", "elementwise", tgt.dtype, 0.0, 0.0, 2.0 * kv_tok, 0.0, tgt.dtype))
    out += [_matmul(tgt, _short(i, s, pc), pc, f, rows) for s, pc, f in attn if s == "o_proj"]
    out += [_norm(tgt, nm, a.hidden, rows) for nm in norms[1:]]
    out += [_matmul(tgt, _short(i, s, pc), pc, f, rows) for s, pc, f in mlp]
    out.append(_elementwise(tgt, a, rows))
    return out


def _ranges(ids: list[int]) -> str:
    parts, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def forward(plan: Plan, tgt: Target, batch: int, n: int, past: float, head_tokens: int, prompt: float | None = None,
            layer_ids: list[int] | None = None) -> Forward:
    """Price one forward of ``n`` new tokens per row over ``past`` cached ones, ``batch`` rows;
    the LM head runs on ``head_tokens`` positions per row. ``layer_ids``: decoder layers run
    (a self-speculative draft skips some)."""
    ids = list(range(plan.arch.layers)) if layer_ids is None else layer_ids
    fw = Forward()
    groups: dict[tuple, tuple[list[int], list[dict]]] = {}
    for i in ids:
        rows = _layer_rows(plan, tgt, i, batch, n, past, prompt)
        sig = tuple((r["op"], r["format"], round(r["flops"]), round(r["bytes"])) for r in rows)
        groups.setdefault(sig, ([], rows))[0].append(i)
    for layer_list, rows in groups.values():
        for r in rows:
            fw.rows.append({"layers": _ranges(layer_list), "count": len(layer_list), **r})
    head_rows = batch * head_tokens
    fw.rows.append({"layers": "head", "count": 1, **_norm(tgt, "final_norm", plan.arch.hidden, head_rows)})
    for pc, f in plan.head:
        fw.rows.append({"layers": "head", "count": 1, **_matmul(tgt, pc.name, pc, f, head_rows)})
    for r in fw.rows:
        t = r["time_ms"] / 1e3 * r["count"]
        fw.roofline_seconds += t
        fw.bytes += r["bytes"] * r["count"]
        if r["kind"] != "norm":
            fw.flops += r["flops"] * r["count"]
        if r["bound"] == "compute":
            fw.compute_bound_seconds += t
    dense_linears = len(plan.arch.linears())
    extra_ops = sum(len(plan.layers[i]) - dense_linears for i in ids) + len(plan.head) - 1
    fw.overhead_seconds = (tgt.per_step_us + tgt.per_layer_us * len(ids) + tgt.per_op_us * max(extra_ops, 0)) / 1e6
    fw.seconds = fw.roofline_seconds + fw.overhead_seconds
    return fw


def measured_step(step_s: float, step_bytes: float, step_flops: float, profile: dict) -> dict:
    """A measured step (``leanfm bench``'s decode) against the flat roofline of ``profile``:
    ``roofline_fraction`` = max(bytes / ``memory_bandwidth_gbps``, flops / ``peak_gflops_fp32``) /
    ``step_s`` (1.0 = running at the hardware limit), ``achieved_gbps`` = bytes / ``step_s``.
    ``{}`` when the profile lacks either rate."""
    bw, peak = profile.get("memory_bandwidth_gbps"), profile.get("peak_gflops_fp32")
    if not bw or not peak:
        return {}
    bound = max(step_bytes / (bw * 1e9), step_flops / (peak * 1e9))
    return {"achieved_gbps": step_bytes / step_s / 1e9, "roofline_fraction": bound / step_s, "decode_bytes_per_step": step_bytes}
