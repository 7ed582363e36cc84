"""Decoding-time techniques: speculative decoding (draft model, self-speculative layer skip,
prompt lookup) and CALM-style dynamic early exit. Importing registers ``speculative`` and
``early_exit``; applying one attaches a generation policy used by :func:`generate_with_policy`.
"""
from .drafts import ModelDraft, PromptLookupDraft, check_compatible, lookup_continuation, self_draft
from .early_exit import EarlyExitStepper, early_exit_fidelity, early_exit_generate
from .policy import EarlyExitConfig, SpeculativeConfig, generate_with_policy
from .speculative import plain_generate, speculative_generate
from .steppers import ModelStepper, Stepper

__all__ = [
    "EarlyExitConfig", "EarlyExitStepper", "ModelDraft", "ModelStepper", "PromptLookupDraft", "SpeculativeConfig", "Stepper",
    "check_compatible", "early_exit_fidelity", "early_exit_generate", "generate_with_policy", "lookup_continuation",
    "plain_generate", "self_draft", "speculative_generate",
]
