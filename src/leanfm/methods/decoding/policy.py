"""Decoding techniques as configs: ``speculative`` and ``early_exit``.

Applying one attaches a generation policy to the model (``model.leanfm_decoder``); the weights
are untouched. Measurement code decodes through :func:`generate_with_policy` (plain greedy when
no policy is attached); ``leanfm.measure.decoding`` times a policy against plain decoding, and
each policy's ``metrics(stats)`` turns the counters of its runs into reported metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import BaseConfig, register
from ...errors import LeanfmError
from ..layers import decoder_layers
from .drafts import ModelDraft, PromptLookupDraft, check_compatible, self_draft, skip_by_influence
from .early_exit import CRITERIA, check_threshold, default_min_layer, early_exit_generate
from .speculative import plain_generate, speculative_generate
from .steppers import ModelStepper, check_skip

SPECIAL_DRAFTS = ("self", "prompt_lookup")


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

    method = "speculative"
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

    def check_model(self, model: nn.Module) -> None:
        if self.skip_layers:
            check_skip(len(decoder_layers(model)), self.skip_layers)


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

    method = "early_exit"
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

    def check_model(self, model: nn.Module) -> None:
        n = len(decoder_layers(model))
        if n < 2:
            raise LeanfmError("early exit needs a model with at least 2 decoder layers")
        if self.min_layer is not None and self.min_layer > n - 2:
            raise LeanfmError(f"min_layer={self.min_layer} must be <= {n - 2} (the model has {n} decoder layers)")


class SpeculativePolicy:
    name = "speculative"

    def __init__(self, cfg: SpeculativeConfig, skip: list[int] | None = None, draft_model: nn.Module | None = None):
        self.cfg, self.skip, self.draft_model = cfg, skip, draft_model

    def drafter(self, model: nn.Module):
        if self.cfg.draft == "self":
            return self_draft(model, self.skip)
        if self.cfg.draft == "prompt_lookup":
            return PromptLookupDraft(self.cfg.ngram_max)
        return ModelDraft(ModelStepper(self.draft_model), name=self.cfg.draft)

    @staticmethod
    def metrics(stats: list[dict]) -> dict:
        """Over several runs: accepted / proposed draft tokens, accepted draft tokens per round."""
        proposed, accepted, rounds = (sum(s[k] for s in stats) for k in ("proposed", "accepted", "rounds"))
        return {"acceptance_rate": accepted / proposed if proposed else 0.0,
                "mean_accepted_tokens": accepted / rounds if rounds else 0.0}

    def generate(self, model, input_ids, max_new_tokens, generator=None, eos_token_id=None):
        c = self.cfg
        return speculative_generate(model, self.drafter(model), input_ids, max_new_tokens, k=c.k, temperature=c.temperature,
                                    top_k=c.top_k, generator=generator, eos_token_id=eos_token_id)


class EarlyExitPolicy:
    name = "early_exit"

    def __init__(self, cfg: EarlyExitConfig):
        self.cfg = cfg

    @staticmethod
    def metrics(stats: list[dict]) -> dict:
        """Over several runs: decoder layers used per decode step, share of steps that exited early."""
        steps = sum(s["decode_steps"] for s in stats)
        layers = sum(s["mean_layers_used"] * s["decode_steps"] for s in stats)
        exits = sum(s["early_exit_rate"] * s["decode_steps"] for s in stats)
        return {"mean_layers_used": layers / steps if steps else float(stats[0]["n_layers"]),
                "early_exit_rate": exits / steps if steps else 0.0}

    def generate(self, model, input_ids, max_new_tokens, generator=None, eos_token_id=None):
        c = self.cfg
        return early_exit_generate(model, input_ids, max_new_tokens, c.threshold, c.min_layer, c.check_every, c.criterion,
                                   eos_token_id=eos_token_id)


def _attach(model: nn.Module, policy) -> None:
    old = getattr(model, "leanfm_decoder", None)
    if old is not None:
        raise LeanfmError(f"the model already has a decoding policy ({old.name}); apply only one of speculative / early_exit")
    model.leanfm_decoder = policy


def _target_tokenizer(model: nn.Module):
    return getattr(model, "leanfm_info", {}).get("tokenizer")


@register(SpeculativeConfig)
def apply_speculative(model: nn.Module, cfg: SpeculativeConfig, calib: torch.Tensor | None) -> dict:
    cfg.check_model(model)
    n = len(decoder_layers(model))
    info: dict = {"simulated": False}
    skip, draft_model = None, None
    if cfg.draft == "self":
        if cfg.skip_layers:
            skip = check_skip(n, cfg.skip_layers)
        else:
            if calib is None:
                raise LeanfmError("draft: self without skip_layers picks layers by block influence and needs calibration data")
            skip, bi = skip_by_influence(model, calib, cfg.skip_fraction or 0.5)
            info["block_influence"] = [round(b, 6) for b in bi]
        info.update(kernel=f"self-speculative decoding (layer-skip draft, {len(skip)} of {n} layers skipped)", skip_layers=skip)
    elif cfg.draft == "prompt_lookup":
        info["kernel"] = "prompt-lookup decoding (n-gram draft)"
    else:
        from ...models.load import load

        draft_model, draft_tok = load(cfg.draft)
        p = next(model.parameters())
        draft_model.to(device=p.device, dtype=p.dtype)
        check_compatible(model, draft_model, _target_tokenizer(model), draft_tok)
        info["kernel"] = f"speculative decoding (draft model {cfg.draft})"
        info["draft_params"] = sum(q.numel() for q in draft_model.parameters())
    _attach(model, SpeculativePolicy(cfg, skip, draft_model))
    return info


@register(EarlyExitConfig)
def apply_early_exit(model: nn.Module, cfg: EarlyExitConfig, calib=None) -> dict:
    cfg.check_model(model)
    n = len(decoder_layers(model))
    _attach(model, EarlyExitPolicy(cfg))
    return {"simulated": False, "kernel": f"dynamic early exit (CALM {cfg.criterion}; skipped layers' KV from the exit state)",
            "n_layers": n, "min_layer_used": default_min_layer(n) if cfg.min_layer is None else cfg.min_layer}


def generate_with_policy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         generator: torch.Generator | None = None, eos_token_id: int | None = None,
                         policy=None) -> tuple[torch.Tensor, dict]:
    """Decode ``input_ids [1, P]`` with the model's attached policy (or ``policy``); plain greedy
    without one. Returns ``([1, P + G] ids, stats)``; stats name the policy and its counters."""
    policy = policy if policy is not None else getattr(model, "leanfm_decoder", None)
    if policy is None:
        return plain_generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    return policy.generate(model, input_ids, max_new_tokens, generator=generator, eos_token_id=eos_token_id)
