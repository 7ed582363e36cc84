"""Declarations of the fine-tuning methods (torch-free): ``lora``, ``dora``, ``qlora``, ``full``,
``kd`` and ``mezo``.

A tuning step is a recipe step like any other (``{method: kd, steps: 300}`` after ``wanda``): it
trains the model in place on its own training text and leaves merged float weights, so it
changes no inference cost. What it holds in memory while it trains (trainable parameters,
gradients, optimizer state, activations, a teacher) is declared by :meth:`TuneConfig.train_state`
for the predictor's training what-if. The handler is :func:`leanfm.methods.tune.handler.tune_step`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import BaseConfig
from ...errors import LeanfmError

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
SCHEDULES = ("constant", "cosine")
# bytes of optimizer state per trainable parameter (AdamW: two fp32 moments; bitsandbytes'
# 8-bit AdamW: two uint8 moments plus one fp32 absmax per block of 256; plain SGD: none)
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 256, "sgd": 0.0}


def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise LeanfmError(f"{name}={value!r} must be a {'number' if kind is float else 'whole number'} > 0")


@dataclass
class TuneConfig(BaseConfig):
    """Fields shared by the fine-tuning methods.

    steps: optimizer steps (each ``batch`` windows of ``seqlen`` tokens).
    lr: peak learning rate (> 0). schedule: constant | cosine (decay to 0 after ``warmup`` steps).
    warmup: linear warm-up steps. batch, seqlen: windows per step and tokens per window.
    data: training text, gensim-wiki (default) or a local .txt file; never the evaluation split
        (refused when it overlaps WikiText-2's test text).
    optimizer: adamw | adamw8bit (bitsandbytes' 8-bit AdamW) | sgd. weight_decay: decoupled.
    max_grad_norm: clip the gradient norm (null: no clipping).
    checkpointing: recompute each decoder layer's activations in the backward pass (gradient
        checkpointing: activation memory of one layer instead of all).
    keep_sparsity: weights that a pruning step zeroed stay zero (their gradient is masked and
        they are re-zeroed after each step), so a pruned model stays pruned.
    seed: order of the training windows.
    """

    produces = "tuned-weights"
    backward: ClassVar[bool] = True  # False: zeroth-order (forward passes only)

    steps: int = 100
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int = 0
    batch: int = 4
    seqlen: int = 256
    data: str = "gensim-wiki"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    checkpointing: bool = False
    keep_sparsity: bool = True
    seed: int = 0

    handler = "leanfm.methods.tune.handler:tune_step"

    def validate(self) -> None:
        _positive("steps", self.steps)
        _positive("lr", self.lr, float)
        _positive("batch", self.batch)
        if isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise LeanfmError(f"seqlen={self.seqlen!r} must be a whole number >= 2")
        if self.schedule not in SCHEDULES:
            raise LeanfmError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise LeanfmError(f"warmup={self.warmup!r} must be a whole number in [0, steps={self.steps})")
        if self.optimizer not in OPTIMIZERS:
            raise LeanfmError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.weight_decay < 0:
            raise LeanfmError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise LeanfmError(f"max_grad_norm={self.max_grad_norm} must be > 0 (or null for no clipping)")

    def effect(self, eff) -> None:
        """Adapters are merged and weights stay float: inference costs what the model cost before."""
        eff.neutral.append(f"{self.method}: trained weights keep their shapes and format (adapters merged)")

    def lora_spec(self) -> dict | None:
        """The LoRA adapter this step trains (peft's settings), or None when it trains the weights."""
        return None

    def how(self) -> str:
        """How it trains, for the run's ``kernel`` flag."""
        if not self.backward:
            return "zeroth-order SGD, two forward passes per step, no backward"
        spec = self.lora_spec()
        what = f"peft {'DoRA' if spec['dora'] else 'LoRA'} adapters (rank {spec['rank']}), merged" if spec else "all float weights"
        return f"autograd on {what}{', gradient checkpointing' if self.checkpointing else ''}, {self.optimizer}"

    def train_state(self) -> dict:
        """What training holds besides the model's weights, per trainable parameter and per layer,
        for the predictor's training memory and time (:mod:`leanfm.predict.training`)."""
        return {"trainable": "all" if self.lora_spec() is None else "adapters", "adapter": self.lora_spec(),
                "grads": self.backward, "optimizer_bytes": OPTIMIZER_STATE_BYTES[self.optimizer] if self.backward else 0.0,
                "activations": ("checkpointed" if self.checkpointing else "all") if self.backward else "inference",
                "base_bits": None, "teacher": False, "forwards_per_step": 1 if self.backward else 2}


@dataclass
class LoraFields:
    """rank: adapter rank r (> 0). lora_alpha: scale numerator (the update is alpha/r · B·A).
    dropout: on the adapter's input. targets: module names or patterns the adapters wrap (peft's
    ``target_modules``; ``all-linear``: every linear except the LM head)."""

    rank: int = 16
    lora_alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)

    def _check_lora(self) -> None:
        _positive("rank", self.rank)
        _positive("lora_alpha", self.lora_alpha, float)
        if not 0 <= self.dropout < 1:
            raise LeanfmError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise LeanfmError("targets is empty; name the modules to adapt (e.g. [q_proj, v_proj]) or all-linear")

    def _lora(self, dora: bool = False) -> dict:
        return {"rank": self.rank, "lora_alpha": self.lora_alpha, "dropout": self.dropout,
                "targets": list(self.targets), "dora": dora}


@dataclass
class LoraConfig(LoraFields, TuneConfig):
    """LoRA (Hu et al., 2022): train low-rank adapters B·A beside frozen weights (peft), then merge.

    The TuneConfig fields (steps, lr, batch, seqlen, data, optimizer, ...) plus rank, lora_alpha,
    dropout and targets.
    """

    method = "lora"
    lr: float = 1e-3

    def validate(self) -> None:
        super().validate()
        self._check_lora()

    def lora_spec(self) -> dict | None:
        return self._lora()


@dataclass
class DoraConfig(LoraConfig):
    """DoRA (Liu et al., 2024): LoRA on the weight's direction with a trained magnitude per column.

    Same fields as ``lora``.
    """

    method = "dora"

    def lora_spec(self) -> dict | None:
        return self._lora(dora=True)


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA (Dettmers et al., 2023): LoRA on a frozen 4-bit NF4 base (bitsandbytes), merged into
    the dequantized base.

    The ``lora`` fields plus quant_type (nf4 | fp4) and double_quant (quantize the block scales too).
    """

    method = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        if self.quant_type not in ("nf4", "fp4"):
            raise LeanfmError(f"quant_type={self.quant_type!r} is not one of nf4, fp4")

    def train_state(self) -> dict:
        return {**super().train_state(), "base_bits": 4}

    def how(self) -> str:
        return (f"autograd on peft LoRA adapters (rank {self.rank}) over a frozen bitsandbytes {self.quant_type} base, merged "
                f"into the dequantized base{', gradient checkpointing' if self.checkpointing else ''}, {self.optimizer}")


@dataclass
class FullTuneConfig(TuneConfig):
    """Full fine-tuning: every float weight trained on next-token prediction.

    The TuneConfig fields.
    """

    method = "full"
    lr: float = 2e-5


@dataclass
class KDConfig(LoraFields, TuneConfig):
    """Knowledge distillation (Hinton et al., 2015): the uncompressed model teaches the compressed one.

    The TuneConfig fields plus
    teacher: the teacher model (alias or folder; null: the model this recipe started from).
    temperature: softens both distributions; the loss is T² · KL(teacher ‖ student) per token.
    kd_weight: weight of the distillation term; 1 − kd_weight goes to next-token cross-entropy.
        The defaults (T = 1, 0.5) recovered the most of wanda50's gap on SmolLM2-135M of the three
        settings measured (docs/benchmarks.md: 59.9% against 56.6% for KL only and 51.9% for T = 2).
    hidden_weight: weight of matching the last hidden state (MSE over the teacher's variance; 0: off).
    adapter: none (train all student weights) | lora (train LoRA adapters of rank, lora_alpha,
        dropout and targets, then merge).
    """

    method = "kd"
    lr: float = 5e-5
    teacher: str | None = None
    temperature: float = 1.0
    kd_weight: float = 0.5
    hidden_weight: float = 0.0
    adapter: str = "none"

    def validate(self) -> None:
        super().validate()
        _positive("temperature", self.temperature, float)
        if not 0 <= self.kd_weight <= 1:
            raise LeanfmError(f"kd_weight={self.kd_weight} must be in [0, 1]")
        if self.hidden_weight < 0:
            raise LeanfmError(f"hidden_weight={self.hidden_weight} must be >= 0")
        if self.adapter not in ("none", "lora"):
            raise LeanfmError(f"adapter={self.adapter!r} is not one of none, lora")
        if self.adapter == "lora":
            self._check_lora()

    def lora_spec(self) -> dict | None:
        return self._lora() if self.adapter == "lora" else None

    def train_state(self) -> dict:
        return {**super().train_state(), "teacher": True}


@dataclass
class MezoConfig(TuneConfig):
    """MeZO (Malladi et al., 2023): zeroth-order SGD, two forward passes per step and no backward.

    Each step perturbs every trainable weight by ±eps·z (z drawn again from a per-step seed, never
    stored), takes the loss difference as the gradient along z and steps along z: inference-level
    memory. The TuneConfig fields (optimizer must be sgd; checkpointing does not apply) plus eps.
    """

    method = "mezo"
    backward = False
    lr: float = 1e-6
    optimizer: str = "sgd"
    max_grad_norm: float | None = None
    eps: float = 1e-3

    def validate(self) -> None:
        super().validate()
        _positive("eps", self.eps, float)
        if self.optimizer != "sgd":
            raise LeanfmError(f"mezo steps with plain SGD along its perturbation; optimizer={self.optimizer!r} must be sgd")
        if self.checkpointing:
            raise LeanfmError("mezo runs no backward pass: checkpointing does not apply (set it to false)")
