"""Decoding techniques' handlers: ``speculative`` and ``early_exit`` (declared in :mod:`.decl`).

Applying one attaches a generation policy to the model (``model.leanfm_decoder``); the weights
are untouched. Measurement code decodes through :func:`generate_with_policy` (plain greedy when
no policy is attached); ``leanfm.measure.decoding`` times a policy against plain decoding, and
each policy's ``metrics(stats)`` turns the counters of its runs into reported metrics.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import LeanfmError
from ..layers import decoder_layers
from .decl import SPECIAL_DRAFTS, EarlyExitConfig, SpeculativeConfig  # noqa: F401 (old import path)
from .drafts import ModelDraft, PromptLookupDraft, check_compatible, self_draft, skip_by_influence
from .early_exit import default_min_layer, early_exit_generate
from .speculative import plain_generate, speculative_generate
from .steppers import ModelStepper, StaticStepper, check_skip


class SpeculativePolicy:
    name = SpeculativeConfig.method

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

    def compiled(self, model, max_len: int):
        """``(generate, steppers)``: this policy's generation over static-cache steppers with compiled
        steps (target, and the draft model or layer-skip view), built once and reused by every call
        of ``generate(input_ids, max_new_tokens, generator=None, eos_token_id=None)`` with a prompt
        and output that fit ``max_len`` positions."""
        c = self.cfg
        target = StaticStepper(model, max_len + c.k + 1)
        if c.draft == "self":
            drafter = ModelDraft(StaticStepper(model, max_len + c.k + 1, self.skip), name=f"self (skip {len(self.skip)} layers)")
        elif c.draft == "prompt_lookup":
            drafter = PromptLookupDraft(c.ngram_max)
        else:
            drafter = ModelDraft(StaticStepper(self.draft_model, max_len + c.k + 1), name=c.draft)

        def generate(input_ids, max_new_tokens, generator=None, eos_token_id=None):
            return speculative_generate(target, drafter, input_ids, max_new_tokens, k=c.k, temperature=c.temperature,
                                        top_k=c.top_k, generator=generator, eos_token_id=eos_token_id)

        return generate, [s for s in (target, getattr(drafter, "stepper", None)) if s is not None]


class EarlyExitPolicy:
    name = EarlyExitConfig.method
    # no ``compiled``: the exit point is data-dependent control flow between layers, so a compiled
    # early exit needs one graph per layer segment and per KV-copy tail; it decodes eagerly

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
