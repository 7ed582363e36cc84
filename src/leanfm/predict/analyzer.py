"""Predict what a recipe does to a model on a piece of hardware, from shapes alone.

``predict(model, recipe, hardware, batch, prompt, gen)`` prices a prefill of ``prompt`` tokens and
a decode step at the mean context of the generation, op by op on the roofline
(:mod:`.roofline`), for the compressed model and for the uncompressed baseline on the same
hardware, and returns a JSON-able dict: per-op tables, times, throughput, memory, energy, money,
CO2, the speedup and whether one is to be expected (and why), and the assumptions made.

Conventions:
- dense weights, activations and the KV cache are in the profile's ``default_dtype`` (fp32 on
  CPUs, bf16 on data-center GPUs): the baseline is that model, unmodified;
- the decode step is priced at context ``prompt + (gen + 1) / 2`` keys, the mean over the
  generated tokens (the context :mod:`leanfm.measure.flops` uses, so ``flops_per_token`` is
  comparable with measured runs); ``tpot_ms`` is its time, ``decode_tokens_per_s`` = batch x 1000 /
  ``tpot_ms``;
- speculative decoding (Leviathan et al. 2023, eq. 1): with acceptance rate a and k draft tokens a
  verification round yields E = (1 - a^(k+1)) / (1 - a) tokens and costs k draft steps plus one
  target forward over k + 1 tokens, so time per token = (k t_draft + t_verify) / E;
- a setup whose memory total exceeds the hardware's ``memory_gb`` cannot run there: ``fits`` is
  false, ``will_speed_up``, ``energy_j_per_token``, ``usd_per_million_tokens`` and
  ``co2_g_per_million_tokens`` are null (keys kept) and ``no_verdict_reason`` /
  ``will_speed_up_reason`` say why; times and speed-up ratios remain as what-if numbers;
- ``prompt + gen`` beyond the config's ``max_position_embeddings`` is refused.
"""
from __future__ import annotations

import functools

from ..errors import LeanfmError
from .arch import Arch, load_arch
from .curves import gemv_seconds, rate_for_rows
from .formats import DTYPE_BYTES, resolve
from .kvcache import kv_cache_bytes
from .recipe_effects import Effects, Piece, check_quant_shape, recipe_effects
from .roofline import Forward, Plan, Target, forward

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_ACCEPTANCE = 0.6  # used only when a recipe decodes speculatively and none is given
GB = 1e9


def target(hardware="local", dtype: str | None = None) -> Target:
    """A :class:`Target` from a hardware name / YAML path (``load_hardware``) or a profile dict;
    ``dtype`` overrides the profile's dense dtype (weights, activations and KV of the baseline)."""
    from .hardware import kernel_info, load_hardware, peak_flops, validate

    if isinstance(hardware, dict):
        raw = dict(hardware)
        peaks = raw.get("peak_tflops") or {}
        raw.setdefault("default_dtype", "bf16" if raw.get("kind") == "gpu" and "bf16" in peaks else "fp32")
        prof = validate(raw, "<profile dict>")
    else:
        prof = load_hardware(str(hardware))
    if dtype is not None:
        if dtype not in DTYPE_BYTES:
            raise LeanfmError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_BYTES)}")
        prof = {**prof, "default_dtype": dtype}
    dtype = prof["default_dtype"]
    if dtype not in DTYPE_BYTES:
        raise LeanfmError(f"hardware {prof['name']}: default_dtype '{dtype}' is not one of {', '.join(DTYPE_BYTES)}")
    peak_flops(prof, dtype)  # one-line error if the dense dtype has no rate
    return Target(
        profile=prof, dtype=dtype, elem_bytes=DTYPE_BYTES[dtype], bandwidth=float(prof["memory_bandwidth_gbps"]) * 1e9,
        peak=functools.lru_cache(maxsize=None)(lambda d: peak_flops(prof, d)),
        kernels=functools.lru_cache(maxsize=None)(lambda f: kernel_info(f, prof)),
        per_step_us=float(prof.get("overhead_us_per_model_step") or 0.0),
        per_layer_us=float(prof.get("overhead_us_per_layer") or 0.0),
        per_op_us=float(prof.get("overhead_us_per_op") or 0.0),
        gemv_seconds=gemv_seconds(prof["gemv_grid"]) if prof.get("gemv_grid") else None,
        gemm_rate=rate_for_rows(prof["gemm_fp32_curve"]) if prof.get("gemm_fp32_curve") else None,
        gemm_slowdown=rate_for_rows(prof["gemm_dram_slowdown"]) if prof.get("gemm_dram_slowdown") else None,
        elementwise=str(prof.get("elementwise", "fused")),
    )


def build_plan(arch: Arch, eff: Effects, tgt: Target) -> Plan:
    """Apply the recipe's effects to the architecture and resolve every matmul's format."""
    a = eff.structure(arch)
    cache: dict[tuple, list] = {}

    def formats(name, in_f, out_f, bias, tied=False):
        pieces = eff.pieces(name, in_f, out_f, bias, tied)
        key = tuple((p.name.rsplit(".", 1)[-1], p.in_features, p.out_features, p.quant, p.sparsity) for p in pieces)
        if key not in cache:  # layers repeat: resolve each distinct piece once
            cache[key] = [resolve(p, tgt.profile, tgt.dtype, tgt.kernels) for p in pieces]
        return list(zip(pieces, cache[key]))

    layers = []
    for i in range(a.layers):
        layer = []
        for short, in_f, out_f, bias in a.linears():
            layer += [(short, pc, f) for pc, f in formats(Arch.module_name(i, short), in_f, out_f, bias)]
        layers.append(layer)
    head = formats("lm_head", a.hidden, a.vocab, False, tied=a.tie)
    embed = a.vocab * a.hidden * tgt.elem_bytes
    if eff.embed is not None:  # embed_quant: the table's packed bytes (a shared head adds none)
        piece = Piece("embed_tokens", a.hidden, a.vocab, quant=eff.embed)
        check_quant_shape(eff.embed, piece)
        embed = resolve(piece, tgt.profile, tgt.dtype, tgt.kernels).stored_bytes
    norms = a.hidden * (a.norms_per_layer * a.layers + 1) * tgt.elem_bytes
    return Plan(a, layers, head, eff.kv, embed, norms)


def weight_bytes(plan: Plan) -> tuple[float, float]:
    """(all weights held, weights a decode step reads). A tied LM head that stays dense shares
    the embedding matrix (counted once); a packed one is stored beside it."""
    linears = sum(f.stored_bytes for layer in plan.layers for _, _, f in layer)
    head = sum(f.stored_bytes for pc, f in plan.head if not (pc.tied and (pc.shared or not pc.packed)))
    read = sum(f.read_bytes for layer in plan.layers for _, _, f in layer) + sum(f.read_bytes for _, f in plan.head)
    return plan.embed_bytes + linears + head + plan.norm_bytes, read


def activation_bytes(a: Arch, batch: int, prompt: int, elem: float) -> float:
    """Peak activations of a prefill: the larger of the attention and MLP stages' live tensors
    (residual, normed input, projections) for batch x prompt tokens, plus fp32 logits of the
    last position per row."""
    attn = 2 * a.hidden + (2 * a.heads + 2 * a.kv_heads) * a.head_dim
    mlp = 2 * a.hidden + (3 if a.gated_mlp else 2) * a.intermediate
    return batch * prompt * max(attn, mlp) * elem + batch * a.vocab * 4


def expected_tokens(alpha: float, k: int) -> float:
    """Leviathan et al. 2023, eq. 1: E[tokens per round] = (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def _evenly(n: int, drop: int) -> set[int]:
    return {round((i + 0.5) * n / drop - 0.5) for i in range(drop)} if drop else set()


class _Model:
    """One model + recipe on one target: prices prefill and decode steps."""

    def __init__(self, arch: Arch, eff: Effects, tgt: Target, acceptance: float | None):
        self.eff, self.tgt = eff, tgt
        self.plan = build_plan(arch, eff, tgt)
        self.spec = eff.speculative
        self.alpha = DEFAULT_ACCEPTANCE if acceptance is None else acceptance
        self.draft: _Model | None = None
        if self.spec and self.spec.draft not in ("self", "prompt_lookup"):
            self.draft = _Model(load_arch(self.spec.draft), recipe_effects("baseline"), tgt, None)

    def prefill(self, batch: int, prompt: int) -> Forward:
        return forward(self.plan, self.tgt, batch, prompt, 0, 1, prompt)

    def step(self, batch: int, context: float, prompt: int) -> Forward:
        """One plain decode step whose new token attends to ``context`` keys."""
        return forward(self.plan, self.tgt, batch, 1, context - 1, 1, prompt)

    def tpot(self, batch: int, context: float, prompt: int) -> tuple[float, dict]:
        """Seconds per generated token per row, and the speculative breakdown (empty if none)."""
        if not self.spec:
            return self.step(batch, context, prompt).seconds, {}
        k, a = self.spec.k, self.alpha
        verify = forward(self.plan, self.tgt, batch, k + 1, context - 1, k + 1, prompt).seconds
        if self.spec.draft == "self":
            n = self.plan.arch.layers
            skip = _evenly(n, self.spec.skipped_layers(n))
            draft = forward(self.plan, self.tgt, batch, 1, context - 1, 1, prompt, [i for i in range(n) if i not in skip]).seconds
        elif self.spec.draft == "prompt_lookup":
            draft = 0.0  # n-gram lookup in the token history: no model forward
        else:
            draft = self.draft.step(batch, context, prompt).seconds
        e = expected_tokens(a, k)
        return (k * draft + verify) / e, {"k": k, "acceptance_rate": a, "tokens_per_round": e, "draft_step_ms": draft * 1e3,
                                          "verify_ms": verify * 1e3, "round_ms": (k * draft + verify) * 1e3}

    def memory(self, batch: int, prompt: int, gen: int) -> dict:
        w, read = weight_bytes(self.plan)
        kv = kv_cache_bytes(self.plan.arch, self.plan.kv, prompt + gen, batch, self.tgt.elem_bytes, prompt)
        act = activation_bytes(self.plan.arch, batch, prompt, self.tgt.elem_bytes)
        if self.draft is not None:  # a separate draft model holds its own weights and cache
            dm = self.draft.memory(batch, prompt, gen)
            w, kv = w + dm["weight_bytes"], kv + dm["kv_cache_bytes"]
        total = w + kv + act
        return {"weight_bytes": w, "decode_weight_bytes": read, "kv_cache_bytes": kv, "activation_bytes": act,
                "memory_total_bytes": total, "fits": total <= float(self.tgt.profile["memory_gb"]) * GB}


def _check(batch, prompt, gen, acceptance_rate) -> None:
    for name, v in (("batch", batch), ("prompt", prompt), ("gen", gen)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LeanfmError(f"{name} must be a positive integer (--{name} 1 or more), got {v!r}")
    if acceptance_rate is not None:
        if isinstance(acceptance_rate, bool) or not isinstance(acceptance_rate, (int, float)) or not 0 <= acceptance_rate <= 1:
            raise LeanfmError(f"acceptance rate {acceptance_rate!r} must be a number in [0, 1] (--acceptance-rate 0.6, say)")


def check_context(arch: Arch, prompt: int, gen: int, role: str = "") -> None:
    """One-line error when ``prompt + gen`` tokens exceed the model's ``max_position_embeddings``
    (a config without that field is not checked)."""
    limit = arch.max_position
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return
    if prompt + gen > limit:
        raise LeanfmError(
            f"prompt {prompt} + gen {gen} = {prompt + gen} tokens exceed {role}{arch.name}'s context of {limit} tokens "
            f"(max_position_embeddings in {arch.source}); lower --prompt/--gen so they sum to {limit} or less")


def predict(model, recipe="baseline", hardware="local", batch: int = 1, prompt: int = 128, gen: int = 32,
            acceptance_rate: float | None = None, dtype: str | None = None) -> dict:
    """Roofline prediction for ``model`` (alias, config path, built-in config name, cached hub id
    or config dict) compressed by ``recipe`` (name, ``a+b``, YAML path, Recipe) on ``hardware``
    (name, YAML path or profile dict); ``dtype`` (fp32, bf16, fp16, fp8, ...) overrides the
    hardware's default dense dtype and must be one the hardware computes in. See the module
    docstring for the conventions."""
    from .report import assemble

    _check(batch, prompt, gen, acceptance_rate)
    arch, tgt = load_arch(model), target(hardware, dtype)
    check_context(arch, prompt, gen)
    eff = recipe_effects(recipe)
    cur = _Model(arch, eff, tgt, acceptance_rate)
    if cur.draft is not None:
        check_context(cur.draft.plan.arch, prompt, gen, "the draft model ")
    base = cur if not eff.steps else _Model(arch, recipe_effects("baseline"), tgt, None)
    return assemble(cur, base, batch, prompt, gen, acceptance_rate)
