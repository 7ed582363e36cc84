"""Searchable parameters of a method, declared next to its config (torch-free).

A method's config class lists what a recipe search may vary in ``search_space``::

    search_space = {"bits": Choice(3, 4, 8), "group_size": Choice(32, 64, None, divides="in_features"),
                    "sparsity": Range(0.1, 0.7, step=0.05, when={"pattern": "unstructured"})}

Parameters not listed keep their defaults. ``when`` makes a parameter conditional on values
already drawn for the same step (in declaration order); ``divides`` drops choices that do not
divide every width of that kind in the model (a group size must divide each linear's input
width). The sampler is anything with Optuna's ``suggest_categorical``/``suggest_float``/
``suggest_int`` (an Optuna trial, or :class:`RandomSampler`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import LeanfmError


class Sampler(Protocol):
    def suggest_categorical(self, name: str, choices: list) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...


def none_safe(v):
    """Optuna's categorical choices must be str/int/float/bool: None travels as the string 'null'."""
    return "null" if v is None else v


def _cond(when: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in when.items())


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    values: tuple
    when: dict = field(default_factory=dict)
    divides: str | None = None  # "in_features": keep values that divide every linear's input width (None always kept)

    def __init__(self, *values, when: dict | None = None, divides: str | None = None):
        if not values:
            raise LeanfmError("a Choice needs at least one value")
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "when", dict(when or {}))
        object.__setattr__(self, "divides", divides)

    def options(self, widths: dict[str, list[int]] | None = None) -> tuple:
        if not self.divides or not widths or self.divides not in widths:
            return self.values
        ws = widths[self.divides]
        return tuple(v for v in self.values if v is None or all(w % v == 0 for w in ws))

    def __str__(self) -> str:
        cond = f" when {_cond(self.when)}" if self.when else ""
        return " | ".join("null" if v is None else str(v) for v in self.values) + (" (dividing each input width)" if self.divides else "") + cond

    def draw(self, sampler: Sampler, name: str, widths=None):
        opts = self.options(widths)
        if not opts:
            raise LeanfmError(f"no value of {name} fits this model (choices {list(self.values)}, widths {widths.get(self.divides)})")
        v = sampler.suggest_categorical(name, [none_safe(o) for o in opts])
        return None if v == "null" and None in opts else v


@dataclass(frozen=True)
class Range:
    """A number in ``[low, high]`` (``integer`` for ints; ``step`` a grid; ``log`` a log scale)."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False
    when: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.low <= self.high:
            raise LeanfmError(f"a Range needs low <= high, got [{self.low}, {self.high}]")

    def __str__(self) -> str:
        cond = f" when {_cond(self.when)}" if self.when else ""
        return f"{self.low:g}..{self.high:g}" + (f" step {self.step:g}" if self.step else "") + (" log" if self.log else "") + cond

    def draw(self, sampler: Sampler, name: str, widths=None):
        if self.integer:
            return sampler.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        v = sampler.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)
        return round(v, 10) if self.step else v  # a grid value without float noise (0.30000000000000004)


Dim = Choice | Range


def applies(dim: Dim, drawn: dict) -> bool:
    return all(drawn.get(k) == v for k, v in dim.when.items())


def dim_from_data(name: str, spec, where: str) -> Dim:
    """A dimension from YAML: a list of choices, or ``{low, high[, step, log, integer]}``."""
    if isinstance(spec, list):
        return Choice(*spec)
    if isinstance(spec, dict) and {"low", "high"} <= set(spec):
        extra = set(spec) - {"low", "high", "step", "log", "integer"}
        if extra:
            raise LeanfmError(f"{where}: {name} has unknown keys {sorted(extra)}; a range takes low, high, step, log, integer")
        return Range(spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False)), bool(spec.get("integer", False)))
    if isinstance(spec, (int, float, str, bool)) or spec is None:
        return Choice(spec)
    raise LeanfmError(f"{where}: {name} must be a list of choices or {{low: .., high: ..}}, got {spec!r}")


def inherit(new: Dim, old: Dim | None) -> Dim:
    """A user's override of a declared dimension keeps the declaration's ``when`` and ``divides``
    (a YAML space narrows values; it does not lift the constraints)."""
    if old is None:
        return new
    if isinstance(new, Choice):
        return Choice(*new.values, when=new.when or old.when, divides=new.divides or getattr(old, "divides", None))
    return Range(new.low, new.high, new.step, new.log, new.integer, when=new.when or old.when)


class RandomSampler:
    """Seeded random sampling with Optuna's trial interface (no Optuna needed)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name, choices):
        self.params[name] = self.rng.choice(list(choices))
        return self.params[name]

    def suggest_float(self, name, low, high, *, step=None, log=False):
        if step:
            n = int(round((high - low) / step))
            v = low + step * self.rng.randint(0, n)
        else:
            v = self.rng.uniform(low, high)
        self.params[name] = v
        return v

    def suggest_int(self, name, low, high, *, step=1, log=False):
        self.params[name] = self.rng.randrange(low, high + 1, step)
        return self.params[name]


class ReplaySampler:
    """Answers each ``suggest_*`` from ``answer(name)`` and records the values, with Optuna's
    trial interface. A value outside the offered choices or range raises :class:`Unrepresentable`
    (a recipe the space cannot draw)."""

    def __init__(self, answer):
        self.answer = answer
        self.params: dict[str, Any] = {}

    def _take(self, name, ok) -> Any:
        v = self.answer(name)
        if not ok(v):
            raise Unrepresentable(f"{name} = {v!r} is not among the values the space draws")
        self.params[name] = v
        return v

    def suggest_categorical(self, name, choices):
        return self._take(name, lambda v: any(type(v) is type(c) and v == c for c in choices))

    def suggest_float(self, name, low, high, *, step=None, log=False):
        def ok(v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low - 1e-9 <= v <= high + 1e-9:
                return False
            return step is None or abs((v - low) / step - round((v - low) / step)) < 1e-6
        return float(self._take(name, ok))

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self._take(name, lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high and (v - low) % step == 0)


class Unrepresentable(LeanfmError):
    """A recipe a search space cannot draw (a method it lacks, a value outside its dimensions)."""
