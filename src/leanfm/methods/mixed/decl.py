"""Declaration of per-layer mixed-precision quantization (torch-free).

Each target linear gets one weight format (``w4g64``: 4-bit codes, one scale per 64 input
columns; ``w8``: 8-bit per output channel) chosen from ``formats`` so that the summed sensitivity
score (:mod:`.score`) is smallest while the stored bytes stay within the budget
(:mod:`.allocate`). Bytes are what leanfm stores (:func:`leanfm.formats.layout.stored_weight_bytes`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from ...config import BaseConfig
from ...errors import LeanfmError
from ...formats.layout import stored_weight_bytes
from ...space import Range
from ..effects import QuantSpec, Rule
from ..quantize.decl import BACKEND_CHOICES, check_bits, check_obs_params

ALGORITHMS = ("gptq", "rtn")
_FMT = re.compile(r"^w(\d+)(?:g(\d+))?$")


class WeightFormat(NamedTuple):
    """One candidate grid: ``bits`` codes, one scale per ``group_size`` columns (None = per channel)."""

    name: str
    bits: int
    group_size: int | None

    def fits(self, in_features: int) -> bool:
        return self.group_size is None or in_features % self.group_size == 0

    def bytes(self, in_features: int, out_features: int) -> int:
        return stored_weight_bytes(self.bits, self.group_size, in_features, out_features)

    def nominal_bits(self, in_features: int = 4096) -> float:
        """Stored bits per weight (codes + fp32 scale + uint8 zero per group)."""
        return 8 * self.bytes(in_features, 1) / in_features


def parse_format(name) -> WeightFormat:
    """``"w4g64"`` -> ``WeightFormat("w4g64", 4, 64)``; ``"w8"`` -> per output channel."""
    m = _FMT.match(str(name).strip().lower())
    if not m:
        raise LeanfmError(f"format '{name}' is not understood; write w<bits>g<group> (e.g. w4g64) or w<bits> for per-channel")
    bits, gs = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
    check_bits(bits)
    if gs is not None and gs <= 0:
        raise LeanfmError(f"format '{name}': the group size must be positive")
    return WeightFormat(m.group(0), bits, gs)


def budget_bytes(cfg: "MixedPrecisionConfig", shapes: dict[str, tuple[int, int]]) -> int:
    """The byte budget for target linears ``{name: (in_features, out_features)}``."""
    if cfg.weight_bytes is not None:
        return int(cfg.weight_bytes)
    if cfg.budget_like is not None:
        f = parse_format(cfg.budget_like)
        bad = [n for n, (i, _) in shapes.items() if not f.fits(i)]
        if bad:
            raise LeanfmError(f"budget_like {f.name}: group {f.group_size} does not divide in_features {shapes[bad[0]][0]} of {bad[0]}")
        return sum(f.bytes(i, o) for i, o in shapes.values())
    return int(float(cfg.avg_bits) * sum(i * o for i, o in shapes.values()) // 8)


def candidates(cfg: "MixedPrecisionConfig", shapes: dict[str, tuple[int, int]]) -> dict[str, list[WeightFormat]]:
    """Per layer, the listed formats whose group size divides its input width."""
    fmts = cfg.parsed_formats()
    out = {}
    for n, (i, _) in shapes.items():
        out[n] = [f for f in fmts if f.fits(i)]
        if not out[n]:
            raise LeanfmError(f"no listed format fits layer {n} (in_features {i}); add a per-channel format such as w4 or w8")
    return out


def check_budget(cfg: "MixedPrecisionConfig", shapes: dict[str, tuple[int, int]]) -> int:
    """The budget in bytes, or a one-line error naming the smallest reachable average bits."""
    budget = budget_bytes(cfg, shapes)
    cands = candidates(cfg, shapes)
    least = sum(min(f.bytes(*shapes[n]) for f in fs) for n, fs in cands.items())
    if least > budget:
        params = sum(i * o for i, o in shapes.values())
        raise LeanfmError(
            f"mixed_precision budget of {budget} bytes ({8 * budget / params:.3f} bits/weight) is below the smallest allocation "
            f"of the formats {', '.join(cfg.formats)}: {least} bytes ({8 * least / params:.3f} bits/weight); raise the budget "
            "or list a smaller format (codes of 2-4 bits are all stored in 4)")
    return budget


@dataclass
class MixedPrecisionConfig(BaseConfig):
    """Per-layer mixed precision: each linear gets the format from ``formats`` that its sensitivity score favours under a weight-bytes budget.

    Sensitivity (NVIDIA ModelOpt AutoQuantize's score): for layer l and format f,
    s(l, f) = sum over calibration tokens and output channels of (dL/dy_l)^2 * (x_l (W_l - RTN_f(W_l))^T)^2,
    L the model's next-token loss; one forward + backward per calibration chunk scores every
    layer and format, and the scores are cached under ``$LEANFM_CACHE/sensitivity`` (keyed by
    the model's weights, the formats and the calibration ids), so another budget re-solves the
    allocation (a multiple-choice knapsack, exact DP over bucketed bytes) without re-scoring.
    Then each layer is quantized in its format by ``algorithm`` (gptq: one layer-by-layer pass).

    formats: candidates, ``w<bits>g<group>`` or ``w<bits>`` (per output channel); a format whose
    group does not divide a layer's width is not offered to that layer. Bytes are what leanfm
    stores: codes (2-4 bit codes take a nibble, 5-8 bit a byte), fp32 scale + uint8 zero per
    (row, group), so w3 costs as much as w4 and saves nothing here.
    Budget, exactly one of: ``avg_bits`` (stored bytes <= avg_bits x target weights / 8),
    ``weight_bytes`` (absolute, target linears only), ``budget_like`` (the bytes a uniform
    format, e.g. w4g64, stores for the same layers).
    symmetric: every format's grid. score_tokens: calibration tokens used for scoring (the
    first rows; the quantization pass uses all). tie_siblings: linears that read the same input
    (q/k/v, gate/up; found by a forward, not by name) share one format, as AutoQuantize groups
    them, so their packed kernels still fuse into one call. skip/only/backend and gptq's damp, act_order,
    block_size as for gptq; with backend auto each layer gets the fastest kernel for its format.
    """

    method = "mixed_precision"
    handler = "leanfm.methods.mixed.apply:apply_mixed_precision"
    needs_calibration = True
    produces = "int-weights"
    # 4.25: the listed default formats cannot go below ~4.07 stored bits (w4 per channel)
    search_space = {"avg_bits": Range(4.25, 6.0, step=0.25)}

    algorithm: str = "gptq"
    formats: tuple[str, ...] = ("w4", "w4g64", "w4g32", "w8")
    symmetric: bool = True
    avg_bits: float | None = None
    weight_bytes: int | None = None
    budget_like: str | None = None
    score_tokens: int = 4096
    tie_siblings: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    only: tuple[str, ...] = ()
    backend: str = "auto"
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    def parsed_formats(self) -> list[WeightFormat]:
        return [parse_format(f) for f in self.formats]

    def targets(self, model) -> dict:
        from ..targets import iter_linears

        return dict(iter_linears(model, self.skip, self.only))

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise LeanfmError(f"algorithm '{self.algorithm}' is unknown for mixed_precision; use gptq or rtn")
        if not self.formats:
            raise LeanfmError("mixed_precision needs at least one format, e.g. formats: [w4, w4g64, w8]")
        names = [f.name for f in self.parsed_formats()]
        if len(set(names)) != len(names):
            raise LeanfmError(f"mixed_precision formats {list(self.formats)} list a format twice")
        given = [k for k in ("avg_bits", "weight_bytes", "budget_like") if getattr(self, k) is not None]
        if len(given) != 1:
            raise LeanfmError("mixed_precision needs exactly one budget: avg_bits, weight_bytes or budget_like"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.avg_bits is not None and not 0 < float(self.avg_bits) <= 32:
            raise LeanfmError(f"avg_bits={self.avg_bits} must be in (0, 32]")
        if self.weight_bytes is not None and int(self.weight_bytes) <= 0:
            raise LeanfmError(f"weight_bytes={self.weight_bytes} must be positive")
        if self.budget_like is not None:
            parse_format(self.budget_like)
        if self.score_tokens < 1:
            raise LeanfmError(f"score_tokens={self.score_tokens} must be >= 1")
        if self.backend not in BACKEND_CHOICES:
            raise LeanfmError(f"unknown backend '{self.backend}' for mixed_precision; use one of: {', '.join(BACKEND_CHOICES)}")
        check_obs_params(self.damp, self.block_size)

    def check_model(self, model) -> None:
        from .apply import check_mixed

        check_mixed(self, model)

    def nominal_format(self) -> WeightFormat:
        """The listed format nearest the budget in stored bits per weight (for pricing)."""
        fmts = self.parsed_formats()
        if self.budget_like is not None:
            return parse_format(self.budget_like)
        if self.avg_bits is None:  # weight_bytes: the model's size is unknown here
            return min(fmts, key=lambda f: f.nominal_bits())
        return min(fmts, key=lambda f: (abs(f.nominal_bits() - float(self.avg_bits)), f.nominal_bits()))

    def grids(self) -> list[tuple[int, int | None, bool]]:
        """Every (bits, group_size, symmetric) grid a layer may end up on (for export checks)."""
        return [(f.bits, f.group_size, bool(self.symmetric)) for f in self.parsed_formats()]

    def effect(self, eff) -> None:
        f = self.nominal_format()
        spec = QuantSpec(self.method, int(f.bits), f.group_size, bool(self.symmetric), str(self.backend),
                         simulated=self.backend == "fake", per_layer=True)
        eff.rules.append(Rule(spec, tuple(self.skip), tuple(self.only)))
        how = ("its budget_like format" if self.budget_like is not None else
               "the smallest listed format (weight_bytes: the model's size is not known to the declaration)"
               if self.avg_bits is None else f"the listed format nearest {float(self.avg_bits):g} stored bits per weight")
        eff.unmodelled.append(f"mixed_precision priced as uniform {f.name} ({how}); the real per-layer mix of "
                              f"{', '.join(self.formats)} depends on calibration scores")
