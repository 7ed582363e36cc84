"""``--budget`` and ``--objective`` of ``leanfm search``, and the Pareto set of measured recipes.

``--budget`` is a comma-separated list of constraints, each ``METRIC OP NUMBER[UNIT]``::

    --budget 'weight_bytes<=0.3x, ppl_increase<=5%, tpot_ms_p90<40ms'

* METRIC: a name from docs/results-schema.md, "## Metrics" (``leanfm.metrics.METRICS``).
* OP: ``<=``, ``>=``, ``<`` or ``>``.
* UNIT, by the metric's unit (spaces around it are allowed; all units are case-insensitive,
  so ``80mb`` is ``80MB`` and ``b`` means bytes — no metric is counted in bits):

  - bytes: ``B``; ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000, ``KiB``, ``MiB``,
    ``GiB``, ``TiB`` powers of 1024;
  - fraction (``ppl_increase``, ``top1_agreement``): ``%``, so ``15%`` is ``0.15``;
  - ms: ``ms`` or ``s`` (``2s`` is 2000 ms);
  - tokens/s: ``tok/s`` (optional);
  - % (the ``*_prediction_error_pct`` metrics, already in percent): ``%`` (optional; ``10%`` is 10);
  - × (``speedup``, ``compression_ratio``, already ratios to the baseline): ``x`` (optional;
    ``speedup>=1.5x`` is ``speedup >= 1.5``);
  - any other numeric metric: ``x`` means a multiple of the baseline's value of the same metric
    (``weight_bytes<=0.3x`` is at most 30% of the baseline's weight bytes).

  A plain number is in the metric's own unit (bytes, a fraction, ms, ...).

``--objective`` is a comma-separated list of ``METRIC:max`` or ``METRIC:min``; ``METRIC`` alone
takes the metric's natural direction (``perplexity`` is minimized, ``decode_tokens_per_s``
maximized); metrics without one (``eval_tokens``, ``achieved_gbps``, ...) need it written out.

Mistakes raise :class:`~leanfm.errors.LeanfmError` with one line that names the problem, the
input with ``»`` in front of the offending character and that character's column, e.g.
``--budget 'weight_bytes<=8»OMB', column 16: 'OMB' is not a unit of weight_bytes, which takes ...``.
"""
from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass

from ..errors import LeanfmError
from ..metrics import METRICS, TEXT_METRICS

_BYTES = {"b": ("B", 1.0), "kb": ("KB", 1e3), "mb": ("MB", 1e6), "gb": ("GB", 1e9), "tb": ("TB", 1e12),
          "kib": ("KiB", 2.0 ** 10), "mib": ("MiB", 2.0 ** 20), "gib": ("GiB", 2.0 ** 30), "tib": ("TiB", 2.0 ** 40)}
# The metric's unit (as in METRICS) -> {unit as typed, lowercased: (its canonical spelling, factor to the
# metric's unit)}. "x" on a metric whose unit is not listed under it means "times the baseline's value".
_UNITS = {
    "bytes": _BYTES,
    "fraction": {"%": ("%", 0.01)},
    "ms": {"ms": ("ms", 1.0), "s": ("s", 1000.0)},
    "tokens/s": {"tok/s": ("tok/s", 1.0)},
    "%": {"%": ("%", 1.0)},
    "×": {"x": ("x", 1.0), "×": ("x", 1.0)},
}
_RELATIVE = {"x", "×"}
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP = re.compile(r"<=|>=|==|!=|=<|=>|<|>|=|≤|≥")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

BUDGET_EXAMPLE = "weight_bytes<=0.3x,ppl_increase<=5%"
OBJECTIVE_EXAMPLE = "perplexity,decode_tokens_per_s"


def _number(v) -> float | None:
    """``v`` as a float, or None for a missing, non-numeric or NaN value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


@dataclass(frozen=True)
class Constraint:
    """``metric op value``: ``value`` is in the metric's unit, or a multiple of the baseline's value of
    the metric when ``relative``. ``unit`` is the unit as the user wrote it, only for printing back."""

    metric: str
    op: str
    value: float
    relative: bool = False
    unit: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {', '.join(_OPS)}, not {self.op!r}")

    def __str__(self) -> str:
        scale = 1.0 if self.relative else _UNITS.get(METRICS[self.metric].unit, {}).get(
            self.unit.lower(), ("", 1.0))[1]
        return f"{self.metric} {self.op} {self.value / scale:.12g}{self.unit}"

    def resolve(self, baseline: dict | None = None) -> float:
        """The threshold in the metric's unit; a relative one multiplies the baseline's value of the
        metric (``baseline`` is the baseline run's metrics)."""
        if not self.relative:
            return self.value
        b = _number((baseline or {}).get(self.metric))
        if b is None:
            raise LeanfmError(f"the budget '{self}' is relative to the baseline, but "
                              f"{'the baseline has no ' + self.metric if baseline is not None else 'there is no baseline'};"
                              f" measure the baseline with {self.metric} or give an absolute bound")
        return self.value * b

    def holds(self, metrics: dict, baseline: dict | None = None) -> bool:
        """Whether ``metrics`` meet the bound; False when they lack the metric (nothing shows they do)."""
        v = _number(metrics.get(self.metric))
        return v is not None and _OPS[self.op](v, self.resolve(baseline))

    def violation(self, metrics: dict, baseline: dict | None = None) -> float | None:
        """How far past the bound, relative to it (0.25: 25% over a ``<=`` bound or under a ``>=``
        one); 0.0 within it (also for a value exactly on a strict bound, though :meth:`holds` is
        False there); the absolute excess where the bound is 0; None when ``metrics`` lack the metric."""
        v = _number(metrics.get(self.metric))
        if v is None:
            return None
        t = self.resolve(baseline)
        over = v - t if self.op in ("<=", "<") else t - v
        if over <= 0:
            return 0.0
        return over / abs(t) if t else over


@dataclass(frozen=True)
class Objective:
    """Maximize or minimize ``metric`` (``direction`` is ``"max"`` or ``"min"``)."""

    metric: str
    direction: str

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


def _fail(flag: str, text: str, pos: int, problem: str):
    # One line, where first: the input with » in front of the offending character and that
    # character's 1-based column; then what is wrong and how to fix it.
    raise LeanfmError(f"{flag} '{text[:pos]}»{text[pos:]}', column {pos + 1}: {problem}")


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _nearest(name: str, names) -> list[str]:
    """The closest known names to ``name``: the best match and any nearly as close.

    A far weaker match (``pipeline_weight_bytes`` beside ``weight_bytes`` for
    ``weight_byte``) would only make the user choose between a right and a wrong name.
    """
    scored = sorted(((difflib.SequenceMatcher(None, name, n).ratio(), n) for n in names), reverse=True)
    scored = [(r, n) for r, n in scored if r >= 0.6][:3]
    return [n for r, n in scored if r >= scored[0][0] - 0.1] if scored else []


def _pieces(text: str):
    """(start, end) of each comma-separated piece, as offsets into ``text``."""
    start = 0
    for part in text.split(","):
        yield start, start + len(part)
        start += len(part) + 1


def _skip(text: str, i: int, end: int) -> int:
    while i < end and text[i].isspace():
        i += 1
    return i


def _metric(flag: str, text: str, i: int, end: int, example: str) -> tuple[str, int]:
    m = _NAME.match(text, i, end)
    if not m:
        _fail(flag, text, i, f"expected a metric name (as in '{example}')")
    name = m.group()
    if name not in METRICS:
        close = _nearest(name.lower(), METRICS)
        hint = f"did you mean {_or(close)}?" if close else "the names are listed in docs/results-schema.md, '## Metrics'"
        _fail(flag, text, i, f"unknown metric '{name}'; {hint}")
    if name in TEXT_METRICS:
        _fail(flag, text, i, f"{name} is text, not a number, so it cannot be a budget or an objective")
    return name, m.end()


def _unit_help(metric: str) -> str:
    unit = METRICS[metric].unit
    own = list(dict.fromkeys(c for c, _ in _UNITS.get(unit, {}).values()))
    ways = ["a plain number" + (f" ({unit})" if unit != "–" else "")] + own
    if unit == "fraction":
        ways[-1] = "% (15% is 0.15)"
    if "x" not in own:
        ways.append("x (a multiple of the baseline's value)")
    return f"takes {_or(ways)}"


def _constraint(flag: str, text: str, start: int, end: int) -> Constraint:
    i = _skip(text, start, end)
    if i == end:
        _fail(flag, text, i, "empty constraint (a doubled or trailing comma?)")
    metric, i = _metric(flag, text, i, end, BUDGET_EXAMPLE)
    i = _skip(text, i, end)
    m = _OP.match(text, i, end)
    if not m:
        _fail(flag, text, i, f"expected <=, >=, < or > after {metric}")
    op = {"≤": "<=", "≥": ">="}.get(m.group(), m.group())
    if op not in _OPS:
        _fail(flag, text, i, f"'{op}' is not a bound; use <=, >=, < or >")
    i = _skip(text, m.end(), end)
    n = _NUMBER.match(text, i, end)
    if not n:
        _fail(flag, text, i, f"expected a number after {metric}{op}")
    i = _skip(text, n.end(), end)
    typed = text[i:end].rstrip()
    own = _UNITS.get(METRICS[metric].unit, {})
    value = float(n.group())
    if not typed:
        return Constraint(metric, op, value)
    if typed.lower() in own:
        unit, scale = own[typed.lower()]
        return Constraint(metric, op, value * scale, unit=unit)
    if typed.lower() in _RELATIVE:
        return Constraint(metric, op, value, relative=True, unit="x")
    _fail(flag, text, i, f"'{typed}' is not a unit of {metric}, which {_unit_help(metric)}")


def parse_budget(text: str, flag: str = "--budget") -> list[Constraint]:
    """The constraints of a ``--budget`` string (grammar in this module's docstring). ``flag``
    names the option in error messages."""
    if text is None or not text.strip():
        raise LeanfmError(f"{flag} is empty; give constraints such as '{BUDGET_EXAMPLE}'")
    return [_constraint(flag, text, start, end) for start, end in _pieces(text)]


def parse_objectives(text: str, flag: str = "--objective") -> list[Objective]:
    """The objectives of an ``--objective`` string: ``metric:max``, ``metric:min`` or ``metric``
    (its natural direction), comma-separated, each metric once."""
    if text is None or not text.strip():
        raise LeanfmError(f"{flag} is empty; give objectives such as '{OBJECTIVE_EXAMPLE}' or 'weight_bytes:min'")
    out: list[Objective] = []
    for start, end in _pieces(text):
        i = _skip(text, start, end)
        if i == end:
            _fail(flag, text, i, "empty objective (a doubled or trailing comma?)")
        at = i
        metric, i = _metric(flag, text, i, end, OBJECTIVE_EXAMPLE)
        i = _skip(text, i, end)
        if i == end:
            direction = METRICS[metric].better
            if direction is None:
                _fail(flag, text, at, f"{metric} has no natural direction; write {metric}:max or {metric}:min")
        elif text[i] == ":":
            i = _skip(text, i + 1, end)
            word = text[i:end].rstrip()
            if word.lower() not in ("max", "min"):
                what = f"unknown direction '{word}'" if word else "no direction"
                _fail(flag, text, i, f"{what} for {metric}; write {metric}:max or {metric}:min")
            direction = word.lower()
        else:
            _fail(flag, text, i, f"expected ':max', ':min' or a comma after {metric}")
        if any(o.metric == metric for o in out):
            _fail(flag, text, at, f"{metric} is given twice; give each metric once")
        out.append(Objective(metric, direction))
    return out


def dominates(a: dict, b: dict, objectives: list[Objective], spread_a: dict | None = None,
              spread_b: dict | None = None) -> bool:
    """Whether metrics ``a`` are at least as good as ``b`` in every objective and better in one;
    False when either lacks a value.

    ``spread_a``/``spread_b`` map a metric to the (min, max) of its repeats (speed is measured
    several times; quality is deterministic). Where both points have a spread for a metric and
    the two ranges overlap, the difference is within the measurement noise and counts as a tie:
    neither is better on it. So a candidate is not kept on the front for a speed lead that the
    next run could reverse, and none is pushed off by one."""
    strictly = False
    for o in objectives:
        x, y = _number(a.get(o.metric)), _number(b.get(o.metric))
        if x is None or y is None:
            return False
        ra, rb = (spread_a or {}).get(o.metric), (spread_b or {}).get(o.metric)
        if ra and rb and ra[0] <= rb[1] and rb[0] <= ra[1]:
            continue  # ranges overlap: a tie within the noise
        if o.direction == "min":
            x, y = -x, -y
        if x < y:
            return False
        strictly = strictly or x > y
    return strictly


def pareto_front(points: list[dict], objectives: list[Objective], spreads: list[dict] | None = None) -> list[int]:
    """Indices (ascending) of the points no other point dominates. A point lacking a value of some
    objective is never in the front and does not push others out; equal points are all kept.
    ``spreads[i]``: point i's measured (min, max) per metric, for ties within the noise (see
    :func:`dominates`)."""
    sp = spreads or [None] * len(points)
    complete = [i for i, p in enumerate(points) if all(_number(p.get(o.metric)) is not None for o in objectives)]
    return [i for i in complete
            if not any(dominates(points[j], points[i], objectives, sp[j], sp[i]) for j in complete if j != i)]
