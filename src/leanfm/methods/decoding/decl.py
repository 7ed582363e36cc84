"""Decoding technique declarations (torch-free): ``speculative`` and ``early_exit``.

Each config is the one declaration of its method: parameters and checks, the handler that
attaches its generation policy (in :mod:`.policy`, imported on first apply), the metrics its
runs report and its cost effect for the predictor. Model checks import the torch code they need
when called.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...config import BaseConfig
from ...errors import LeanfmError
from ..effects import SpecDecode
from ...space import Choice, Range

SPECIAL_DRAFTS = ("self", "prompt_lookup")
CRITERIA = ("softmax", "state")  # early-exit confidence measures


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise LeanfmError(f"early-exit threshold={threshold} must be in (0, 1]")


@dataclass
class SpeculativeConfig(BaseConfig):
    """Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a draft proposes ``k``
    tokens, the model verifies them in one forward. Greedy output is identical to plain greedy;
    sampling keeps the model's distribution.

    draft: "self" (the model with some decoder layers skipped, no second model), "prompt_lookup"
        (n-gram match in the prompt / generated text), or a draft model: alias, local directory or
        hub id with the same tokenizer (e.g. qwen2.5-0.5b for qwen2.5-1.5b).
    k: draft tokens per verification round (>= 1).
    skip_layers: for draft "self": decoder layer indices to skip, e.g. [10, 12, 14].
    skip_fraction: for draft "self": share of layers to skip, the lowest block influence
        (ShortGPT) on calibration data (so it needs calib); 0.5 when neither skip field is given.
    temperature: 0 = greedy; > 0 samples (speculative sampling). top_k: optional top-k filter.
    ngram_max: for draft "prompt_lookup": longest n-gram matched (down to 1).
    """

    search_space = {"k": Choice(2, 3, 4, 6)}

    method = "speculative"
    handler = "leanfm.methods.decoding.policy:apply_speculative"
    produces = "decoding-policy"
    adds_metrics = ("acceptance_rate", "mean_accepted_tokens")
    draft: str = "self"
    k: int = 4
    skip_layers: tuple[int, ...] | None = None
    skip_fraction: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    ngram_max: int = 3

    @property
    def needs_calibration(self) -> bool:  # layer choice by block influence needs calibration text
        return self.draft == "self" and not self.skip_layers

    def validate(self) -> None:
        if not isinstance(self.draft, str) or not self.draft:
            raise LeanfmError("draft must be 'self', 'prompt_lookup' or a model alias / directory")
        if self.k < 1:
            raise LeanfmError(f"k={self.k} must be >= 1 (draft tokens per round)")
        if self.temperature < 0:
            raise LeanfmError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise LeanfmError(f"top_k={self.top_k} must be >= 1")
        if self.ngram_max < 1:
            raise LeanfmError(f"ngram_max={self.ngram_max} must be >= 1")
        if self.draft != "self" and (self.skip_layers is not None or self.skip_fraction is not None):
            raise LeanfmError("skip_layers / skip_fraction apply only to draft: self")
        if self.skip_layers is not None and self.skip_fraction is not None:
            raise LeanfmError("give skip_layers or skip_fraction, not both")
        if self.skip_layers is not None and (not self.skip_layers or min(self.skip_layers) < 0):
            raise LeanfmError(f"skip_layers={list(self.skip_layers)} must be a non-empty list of layer indices >= 0")
        if self.skip_fraction is not None and not 0 < self.skip_fraction < 1:
            raise LeanfmError(f"skip_fraction={self.skip_fraction} must be in (0, 1)")

    def check_model(self, model) -> None:
        if self.skip_layers:
            from ..layers import decoder_layers
            from .steppers import check_skip

            check_skip(len(decoder_layers(model)), self.skip_layers)

    def effect(self, eff) -> None:
        eff.speculative = SpecDecode(str(self.draft), int(self.k), len(self.skip_layers) if self.skip_layers else None,
                                     self.skip_fraction)


@dataclass
class EarlyExitConfig(BaseConfig):
    """Dynamic early exit for greedy decoding (CALM, Schuster et al., 2022).

    threshold: exit when the confidence reaches it, in (0, 1]; softmax: top-1 minus top-2
        probability through the shared LM head; state: cosine of consecutive hidden states.
        1.0 practically never exits (output equals the full model).
    min_layer: first decoder layer (0-based) after which an exit is checked; default half the depth.
    check_every: check every n-th layer from min_layer. Each softmax check costs one LM-head
        matmul (for SmolLM2 about 8 decoder layers of work): keep checks rare.
    criterion: "softmax" or "state".
    """

    search_space = {"threshold": Range(0.8, 0.98, step=0.02)}

    method = "early_exit"
    handler = "leanfm.methods.decoding.policy:apply_early_exit"
    produces = "decoding-policy"
    adds_metrics = ("mean_layers_used", "early_exit_rate")
    threshold: float = 0.9
    min_layer: int | None = None
    check_every: int = 1
    criterion: str = "softmax"

    def validate(self) -> None:
        check_threshold(self.threshold)
        if self.min_layer is not None and self.min_layer < 0:
            raise LeanfmError(f"min_layer={self.min_layer} must be >= 0")
        if self.check_every < 1:
            raise LeanfmError(f"check_every={self.check_every} must be >= 1")
        if self.criterion not in CRITERIA:
            raise LeanfmError(f"criterion '{self.criterion}' is unknown; use one of {', '.join(CRITERIA)}")

    def check_model(self, model) -> None:
        from ..layers import decoder_layers

        n = len(decoder_layers(model))
        if n < 2:
            raise LeanfmError("early exit needs a model with at least 2 decoder layers")
        if self.min_layer is not None and self.min_layer > n - 2:
            raise LeanfmError(f"min_layer={self.min_layer} must be <= {n - 2} (the model has {n} decoder layers)")

    def effect(self, eff) -> None:
        eff.unmodelled.append("early_exit is not modelled (its exit layer depends on the text): predicted as plain decoding")
