"""Decoding-time techniques: speculative decoding (draft model, self-speculative layer skip,
prompt lookup) and CALM-style dynamic early exit, declared in :mod:`.decl` (``speculative``,
``early_exit``); applying one attaches a generation policy used by :func:`generate_with_policy`.

Names below are imported from their submodule on first use (PEP 562), so importing the package
(or its ``decl``) does not load torch.
"""
from .. import lazy_exports

_EXPORTS = {
    "EarlyExitConfig": "decl", "SpeculativeConfig": "decl",
    "ModelDraft": "drafts", "PromptLookupDraft": "drafts", "check_compatible": "drafts",
    "lookup_continuation": "drafts", "self_draft": "drafts",
    "EarlyExitStepper": "early_exit", "early_exit_fidelity": "early_exit", "early_exit_generate": "early_exit",
    "generate_with_policy": "policy",
    "plain_generate": "speculative", "speculative_generate": "speculative",
    "ModelStepper": "steppers", "Stepper": "steppers",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
