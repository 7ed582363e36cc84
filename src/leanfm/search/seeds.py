"""Warm start: the built-in recipes a search space can draw, tried before any bred candidate.

A search of a few dozen trials over a space of thousands of compositions should not return
recipes that a user picking a built-in (or two built-ins joined with ``+``) would beat. So the
first trials are the built-in recipes, and the compositions of two built-ins from different
groups, that the space can draw exactly (:meth:`.space.SearchSpace.params_of`) and that the
predictor lets through the budget; NSGA-II then breeds the next generations from them. They
are ordinary trials (counted in ``--trials``, measured, stored); ``search.json`` names the
built-in each one reproduces. At most half the trials are seeds, so the search still explores.
"""
from __future__ import annotations

from ..errors import LeanfmError
from ..recipe import Recipe, builtin_names, compose, load_recipe
from .space import SearchSpace


def candidates(space: SearchSpace, widths: dict | None) -> list[tuple[str, Recipe, dict]]:
    """``(recipe name, recipe, sampler parameters)`` of every built-in and every ``a+b``
    composition of two built-ins the space draws exactly: singles first, then pairs, each in name
    order."""
    singles = []
    for n in builtin_names():
        r = load_recipe(n)
        p = space.params_of(r, widths) if r.steps else None  # the baseline is measured anyway
        if p is not None:
            singles.append((n, r, p))
    pairs = []
    for i, (_, a, _) in enumerate(singles):
        for _, b, _ in singles[i + 1:]:
            for x, y in ((a, b), (b, a)):
                try:
                    r = compose([x, y])  # parsed once above: compose takes Recipe objects as they are
                except LeanfmError:
                    continue
                p = space.params_of(r, widths)
                if p is not None:
                    pairs.append((r.name, r, p))
    return singles + pairs


# groups that remove parameters or structure (more destructive than lowering precision)
_REMOVING = ("smaller-dense", "sparse-weights", "low-rank")


def pick(space: SearchSpace, widths: dict | None, price, budget, base_pred: dict, limit: int) -> list[tuple[str, dict]]:
    """The warm-start trials: candidates the predictor lets through ``budget`` (``price(recipe)``
    gives the predicted metrics, or raises LeanfmError for a composition that cannot run), at
    most ``limit``, gentlest first: fewer steps, then fewer steps that remove parameters
    (structure, pruning, low rank) rather than lower precision, then more of the weight bytes
    kept (the predictor gives no quality, so this orders by how far each moves from the model)."""
    from .screen import screen

    ok = []
    for name, recipe, params in candidates(space, widths):
        try:
            pred = price(recipe)
        except LeanfmError:
            continue
        if screen(budget, pred, base_pred, {}) is None:
            steps = recipe.steps
            ok.append(((len(steps), sum(s.produces in _REMOVING for s in steps), -pred.get("weight_bytes", 0.0), name), name, params))
    return [(n, p) for _, n, p in sorted(ok, key=lambda x: x[0])[:limit]]
