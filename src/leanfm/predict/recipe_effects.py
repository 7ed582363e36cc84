"""What a recipe does to the cost of running a model, read from the methods' own declarations.

Each recipe step is a validated config (torch-free: ``leanfm/methods/<family>/decl.py``); its
``effect`` records what the step does to weights, shapes, the KV cache and decoding on an
:class:`~leanfm.methods.effects.Effects` the roofline prices. No method name is known here: a
method whose declaration has no effect is refused with one line naming it
(:class:`~leanfm.config.NotPriced`), and one that declares itself not modelled (early exit) is
listed in ``unmodelled`` with its reason.
"""
from __future__ import annotations

from ..methods.effects import (Effects, JointRule, KVSpec, LowRankSpec, Piece, QuantSpec, Rule,  # noqa: F401 (re-exported)
                               SparsitySpec, SpecDecode, check_quant_shape)


def _steps(recipe) -> tuple[str, list]:
    """``(recipe name, [config])`` for a name, ``a+b`` composition, path, Recipe or step list."""
    from ..config import config_from_dict
    from ..recipe import load_recipe

    if isinstance(recipe, (list, tuple)):
        return "custom", [s if hasattr(s, "effect") else config_from_dict(dict(s)) for s in recipe]
    if hasattr(recipe, "steps") and hasattr(recipe, "name"):
        return recipe.name, list(recipe.steps)
    r = load_recipe(str(recipe))
    return r.name, list(r.steps)


def recipe_effects(recipe="baseline") -> Effects:
    """Effects of a recipe given by built-in name, ``a+b`` composition, YAML path, Recipe or step list."""
    name, steps = _steps(recipe)
    eff = Effects(recipe=name, steps=[s.method for s in steps])
    for step in steps:
        step.effect(eff)
    return eff
