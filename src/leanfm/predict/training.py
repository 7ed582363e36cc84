"""Training what-if: peak memory and time per step of a tuning step, from the config alone.

Memory (bytes; fp32 training as leanfm runs it, ``dtype_bytes=2`` for a bf16 what-if):

- ``base``: the process before the model (Python, torch, transformers, tokenizer, text); measured
  when predicting for this process, else :data:`RUNTIME_BYTES`;
- ``weights``: the student (decoder linears at 4 bits plus one fp32 absmax per 64 for QLoRA,
  bitsandbytes' NF4 blocks; embeddings, norms and head in float); ``teacher``: a second float
  copy for distillation;
- ``gradients`` of the trainable parameters, ``optimizer`` state (:data:`.decl.OPTIMIZER_STATE_BYTES`
  per trainable parameter) and the optimizer step's temporaries (torch's foreach AdamW: about one
  parameter-sized buffer);
- ``activations`` saved for the backward pass, per token: the coefficients below were counted with
  torch's saved-tensor hooks on transformers' Llama (SDPA attention, whose CPU kernel keeps the
  log-sum-exp, not the s x s probabilities), least-squares over 9 shapes (max error 0.5%, full fine-tuning
  and LoRA; ``tests/test_predict_training.py`` re-counts two shapes); gradient
  checkpointing keeps each layer's input and recomputes one layer at a time;
- ``logits``: the vocabulary-sized tensors alive around the loss: logits, the shifted copy and the
  log-softmax for cross-entropy, their gradients in the backward pass (:data:`LOGIT_COPIES`);
  distillation adds the teacher's logits and both tempered log-softmaxes.

Peak = base + weights + teacher + optimizer + max(activations + logits, gradients + step
temporaries): activations die during the backward pass, while gradients and the optimizer's
temporaries peak at the step. MeZO holds inference activations (one layer's transients), the LM
head's logits for 32 positions at a time, and a block of its perturbation (4 MB, and its copy). Time per step:
training FLOPs (forward 2 per weight per token, backward 4 with weight gradients, 2 for input
gradients only, a recomputed forward with checkpointing, a teacher forward, two forwards for
MeZO) over the profile's peak for the dtype times :data:`MFU`, a nominal utilization.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..methods.tune.kd import HEAD_CHUNK
from ..methods.tune.mezo import BLOCK as MEZO_BLOCK

GB = 1e9
RUNTIME_BYTES = int(0.45e9)  # Python + torch + transformers + a tokenizer, measured here (leanfm tune, smollm2)
MFU = 0.4  # nominal share of fp32 peak a training step reaches (eager PyTorch)

# floats saved for backward per token: per decoder layer (x hidden, x intermediate, x kv width,
# x head_dim, + per adapter rank) and outside the layers (x hidden)
ACT_FULL = {"hidden": 7.84, "intermediate": 4.01, "kv": 1.94, "head_dim": 0.64, "outside": 3.45}
# LoRA on every linear (27 fits: 9 shapes x ranks 2, 8, 16; max error 0.5%); each adapter adds about r
# floats (its A output). Fewer targets save a little less: this stays an upper bound for them.
ACT_ADAPTER = {"hidden": 5.89, "intermediate": 4.01, "kv": 1.96, "head_dim": 0.5, "outside": 0.36, "rank": 1.02}
LOGIT_COPIES = {"ce": 4, "kd": 7}  # vocabulary-sized fp32 tensors per token alive around the loss


@dataclass
class TrainingPlan:
    method: str
    parts: dict[str, int] = field(default_factory=dict)
    flops_per_step: float = 0.0
    step_seconds: float | None = None
    trainable_params: int = 0

    @property
    def peak(self) -> int:
        p = self.parts
        steady = sum(p.get(k, 0) for k in ("base", "weights", "teacher", "optimizer"))
        return steady + max(p.get("activations", 0) + p.get("logits", 0), p.get("gradients", 0) + p.get("step temporaries", 0))

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GB)
        t = f"; {self.step_seconds:.2f} s per step" if self.step_seconds else ""
        return f"training plan ({self.method}): peak {self.peak / GB:.2f} GB = {shown}{t}"


def _params(arch) -> tuple[int, int]:
    """(decoder linear weights, everything else) parameter counts."""
    lin = arch.layers * sum(i * o for _, i, o, _ in arch.linears())
    other = arch.vocab * arch.hidden * (1 if arch.tie else 2) + arch.hidden * (arch.layers * arch.norms_per_layer + 1)
    return lin, other


def adapter_params(arch, spec: dict) -> int:
    """LoRA parameters: r·(in + out) per adapted linear (+ out for DoRA's magnitude)."""
    targets = spec["targets"]
    per = 0
    for short, i, o, _ in arch.linears():
        if targets == ["all-linear"] or short in targets:
            per += spec["rank"] * (i + o) + (o if spec["dora"] else 0)
    return arch.layers * per


def _act_floats(arch, coeff: dict, layers: int, spec: dict | None = None) -> float:
    kv = arch.kv_heads * arch.head_dim
    per_layer = (coeff["hidden"] * arch.hidden + coeff["intermediate"] * arch.intermediate + coeff["kv"] * kv
                 + coeff["head_dim"] * arch.head_dim)
    if spec:
        adapted = sum(spec["targets"] == ["all-linear"] or short in spec["targets"] for short, *_ in arch.linears())
        per_layer += coeff["rank"] * spec["rank"] * adapted
    return layers * per_layer + coeff["outside"] * arch.hidden


def plan_training(arch, cfg, batch: int | None = None, seqlen: int | None = None, base: int | None = None,
                  hardware: dict | None = None, dtype: str = "fp32") -> TrainingPlan:
    """The :class:`TrainingPlan` of tuning step ``cfg`` (a :class:`leanfm.methods.tune.decl.TuneConfig`)
    on ``arch`` with ``batch x seqlen`` tokens per step (default: the config's). ``dtype``: fp32 (as
    leanfm trains), or bf16/fp16 weights, gradients and activations with the profile's peak for it
    (optimizer state as declared)."""
    dtype_bytes = 4 if dtype == "fp32" else 2
    st = cfg.train_state()
    b, s = batch or cfg.batch, seqlen or cfg.seqlen
    tokens = b * s
    lin, other = _params(arch)
    total = lin + other
    spec = st["adapter"]
    trainable = adapter_params(arch, spec) if spec else total
    p = TrainingPlan(cfg.method, trainable_params=trainable)
    p.parts["base"] = RUNTIME_BYTES if base is None else base
    if st["base_bits"]:
        p.parts["weights"] = int(lin * (st["base_bits"] / 8 + 4 / 64) + other * dtype_bytes)
    else:
        p.parts["weights"] = total * dtype_bytes
    p.parts["weights"] += trainable * dtype_bytes if spec else 0
    if st["teacher"]:
        p.parts["teacher"] = total * dtype_bytes
    if st["grads"]:
        p.parts["gradients"] = trainable * dtype_bytes
        p.parts["optimizer"] = int(trainable * st["optimizer_bytes"])
        p.parts["step temporaries"] = trainable * 4 if cfg.optimizer == "adamw" else 0
        coeff = ACT_ADAPTER if spec else ACT_FULL
        if st["activations"] == "checkpointed":
            act = arch.layers * arch.hidden + _act_floats(arch, coeff, 1, spec)
        else:
            act = _act_floats(arch, coeff, arch.layers, spec)
        p.parts["activations"] = int(act * tokens * dtype_bytes)
    else:  # zeroth order: a forward's transients of one layer, and a block of the perturbation
        p.parts["activations"] = int(tokens * (3 * arch.intermediate + 4 * arch.hidden) * dtype_bytes)
        p.parts["step temporaries"] = 2 * min(MEZO_BLOCK, max(arch.vocab * arch.hidden, max(i * o for _, i, o, _ in arch.linears()))) * 4
    if st["grads"]:
        p.parts["logits"] = LOGIT_COPIES["kd" if st["teacher"] else "ce"] * tokens * arch.vocab * 4
    else:  # MeZO's loss runs the head over HEAD_CHUNK positions at a time (methods.tune.kd.chunked_next_token_loss)
        p.parts["logits"] = 2 * b * min(HEAD_CHUNK, s) * arch.vocab * 4
    # FLOPs: 2 per weight per token forward; backward 4 (weight and input gradients) or 2 (input only)
    head = arch.vocab * arch.hidden
    fwd = 2 * (lin + head) * tokens
    if not st["grads"]:
        flops = 2 * fwd
    else:
        flops = fwd + (2 * fwd if not spec else fwd) + (fwd if st["activations"] == "checkpointed" else 0)
        flops += fwd if st["teacher"] else 0
    p.flops_per_step = float(flops)
    if hardware:
        peak = (hardware.get("peak_tflops") or {}).get(dtype)
        if peak:
            p.step_seconds = flops / (peak * 1e12 * MFU)
    return p
