"""Cost effects of recipe steps as plain records (no torch): each method's declaration fills
them (``BaseConfig.effect``), the predictor (``leanfm.predict``) prices them.

- weight quantization: bits, group size, symmetry, activation bits, and which execution
  backend holds the packed codes (``fake`` and SparseGPT's joint quantization are simulated:
  fp32 values, no bytes saved);
- pruning: sparsity, pattern (unstructured or N:M) and backend (``masked``: zeros in a dense
  weight, simulated; ``csr``: a real sparse kernel);
- low rank: each linear becomes two (in -> r, r -> out) when that saves parameters;
- structure: fewer layers, fewer KV groups / MLP channels;
- KV cache: eviction budgets, KV quantization (one policy per model: a later one replaces an
  earlier one); decoding: speculative (draft, k); a method that cannot be priced says why in
  ``unmodelled``; one that leaves inference cost unchanged (fine-tuning with merged adapters)
  says so in ``neutral``.

Which linears a per-linear rule touches follows ``methods/selection.py`` (the rule
``targets.iter_linears`` applies). Rules apply in order: a packed layer (real quantization, CSR)
is no longer an ``nn.Linear`` and later rules pass over it; low rank on a masked layer leaves
dense factors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import LeanfmError
from .lowrank.rank import rank_for, saves_params
from .selection import selected

_SKIP = ("lm_head",)


@dataclass(frozen=True)
class QuantSpec:
    """Integer weights: ``bits`` codes, one scale (and zero unless symmetric) per ``group_size``
    input columns (None = per output channel)."""

    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    backend: str = "auto"
    act_bits: int | None = None  # smoothquant: per-token int activations
    fractional_zero: bool = False  # HQQ: float zero points (stored as fp32)
    simulated: bool = False  # fake-quant: dequantized values written back into the dense weight
    row_local: bool = False  # embed_quant: a lookup gathers rows, so only backends keeping rows whole
    per_layer: bool = False  # mixed_precision: priced as one nominal grid, but each layer gets a format that fits it


@dataclass(frozen=True)
class SparsitySpec:
    method: str
    sparsity: float
    nm: tuple[int, int] | None  # (N, M) pattern, None = unstructured
    backend: str  # "masked" (simulated) or "csr"

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"


@dataclass(frozen=True)
class LowRankSpec:
    method: str
    param_ratio: float | None
    rank_ratio: float | None
    rank: int | None

    def rank_for(self, out_f: int, in_f: int, name: str = "layer") -> int:
        """The rank the method gives this layer (and its one-line error where it refuses)."""
        return rank_for(out_f, in_f, rank=self.rank, rank_ratio=self.rank_ratio, param_ratio=self.param_ratio, name=name)


@dataclass(frozen=True)
class Rule:
    """One per-linear step and the layers it targets."""

    spec: QuantSpec | SparsitySpec | LowRankSpec
    skip: tuple[str, ...] = _SKIP
    only: tuple[str, ...] = ()

    def targets(self, name: str) -> bool:
        return selected(name, self.skip, self.only)  # the rule methods/targets.iter_linears applies


@dataclass
class Piece:
    """A matmul a linear layer runs per token: the layer itself, or one low-rank factor."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    quant: QuantSpec | None = None
    sparsity: SparsitySpec | None = None
    packed: bool = False  # no longer an nn.Linear (QuantLinear, SparseLinear): later steps skip it
    tied: bool = False  # lm_head sharing the embedding matrix
    shared: bool = False  # packed as the quantized embedding table itself (embed_quant): stored once


@dataclass(frozen=True)
class KVSpec:
    method: str
    budget: int | None = None  # tokens kept per full-attention layer (eviction policies)
    sinks: int = 0
    prompt_only: bool = False  # snapkv: compresses the prompt, decoding then appends
    bits: int | None = None  # kv_quant
    group_size: int | None = None
    key_axis: str = "token"
    value_axis: str = "token"


@dataclass(frozen=True)
class SpecDecode:
    draft: str  # "self", "prompt_lookup" or a model
    k: int
    skip_count: int | None = None
    skip_fraction: float | None = None

    def skipped_layers(self, n_layers: int) -> int:
        """Layers a self-draft bypasses (methods/decoding/drafts.skip_by_influence's rounding)."""
        if self.skip_count is not None:
            return self.skip_count
        f = self.skip_fraction if self.skip_fraction is not None else 0.5
        return min(n_layers - 1, max(1, int(f * n_layers + 0.5)))


@dataclass
class Effects:
    recipe: str
    steps: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    drop: tuple[float | None, int | None] | None = None  # layerdrop (fraction, count)
    width: tuple[float, float] | None = None  # (heads_fraction, mlp_fraction)
    kv: KVSpec | None = None
    speculative: SpecDecode | None = None
    embed: QuantSpec | None = None  # embed_quant: the token embedding table's grid
    unmodelled: list[str] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)  # steps that leave inference cost as it was, with why

    def structure(self, arch):
        """``arch`` (a ``predict.arch.Arch``) after width pruning and layer dropping (same rounding as the methods)."""
        a = arch
        if self.width:
            hf, mf = self.width
            drop_groups, drop_ch = int(hf * a.kv_heads + 0.5), int(mf * a.intermediate + 0.5)
            if drop_groups >= a.kv_heads or drop_ch >= a.intermediate:
                raise LeanfmError(f"width pruning ({hf}, {mf}) would remove every KV group or MLP channel of {a.name}; lower it")
            per_group = a.heads // a.kv_heads
            a = replace(a, kv_heads=a.kv_heads - drop_groups, heads=(a.kv_heads - drop_groups) * per_group,
                        intermediate=a.intermediate - drop_ch)
        if self.drop:
            frac, count = self.drop
            n = count if count is not None else max(1, int(frac * a.layers + 0.5))
            if n >= a.layers:
                raise LeanfmError(f"layerdrop would drop {n} of {a.name}'s {a.layers} layers; keep at least one")
            # Which layers go depends on calibration (block influence); assume evenly spread ones,
            # so the mix of sliding / full-attention layers is kept.
            gone = {round((i + 0.5) * a.layers / n - 0.5) for i in range(n)}
            types = tuple(t for i, t in enumerate(a.layer_types) if i not in gone) if a.layer_types else ()
            a = replace(a, layers=a.layers - n, layer_types=types)
        return a

    def pieces(self, name: str, in_f: int, out_f: int, bias: bool = False, tied: bool = False) -> list[Piece]:
        """The matmuls linear ``name`` runs after every per-linear step, in recipe order."""
        pieces = [Piece(name, in_f, out_f, bias, tied=tied)]
        for rule in self.rules:
            out: list[Piece] = []
            for pc in pieces:
                if pc.packed or not rule.targets(pc.name):
                    out.append(pc)
                    continue
                spec = rule.spec
                if isinstance(rule, TiedHeadRule) and not pc.tied:
                    out.append(pc)  # an untied head keeps its own weight
                    continue
                if isinstance(spec, QuantSpec):
                    check_quant_shape(spec, pc)
                    pc.shared = isinstance(rule, TiedHeadRule)
                    pc.quant, pc.packed = spec, not spec.simulated
                elif isinstance(spec, SparsitySpec):
                    if spec.nm and pc.in_features % spec.nm[1]:
                        raise LeanfmError(f"{spec.method} pattern '{spec.pattern}' needs in_features divisible by {spec.nm[1]}, but "
                                          f"{pc.name} has {pc.in_features} after the earlier steps; use another pattern or change "
                                          "the step that sets that width")
                    pc.sparsity, pc.packed = spec, spec.backend == "csr"
                    if isinstance(getattr(rule, "joint", None), QuantSpec):  # pruning with joint fake-quant
                        pc.quant = rule.joint
                elif isinstance(spec, LowRankSpec):
                    if pc.tied:  # tied to the embedding: left alone
                        out.append(pc)
                        continue
                    r = spec.rank_for(pc.out_features, pc.in_features, pc.name)
                    if not saves_params(pc.out_features, pc.in_features, r):
                        out.append(pc)  # no parameters saved: left alone
                        continue
                    out += [Piece(pc.name + ".a", pc.in_features, r), Piece(pc.name + ".b", r, pc.out_features, pc.bias)]
                    continue
                out.append(pc)
            pieces = out
        return pieces


@dataclass(frozen=True)
class TiedHeadRule(Rule):
    """embed_quant: a head tied to the embedding (and still dense) becomes the packed table."""


def check_quant_shape(spec: QuantSpec, pc: Piece) -> None:
    """The quantizers' own shape rules, checked on the width the layer has after the earlier
    steps (a low-rank factor of rank 209, a width-pruned MLP of 1075 channels), so a recipe that
    would fail to pack is refused before it runs."""
    n = pc.in_features
    if spec.group_size is not None and n % spec.group_size and not spec.per_layer:
        raise LeanfmError(f"{spec.method} group_size {spec.group_size} does not divide in_features {n} of {pc.name} after the "
                          "earlier steps; use a group size that divides it, or per-channel (group_size: null)")
    if spec.bits <= 4 and not spec.simulated and n % 2:
        raise LeanfmError(f"{spec.method} packs {spec.bits}-bit codes two per byte, but {pc.name} has an odd in_features {n} "
                          "after the earlier steps; change the step that sets that width, or use backend fake")


@dataclass(frozen=True)
class JointRule(Rule):
    """sparsegpt with ``bits``: masked sparsity plus fake-quantized kept weights."""

    joint: QuantSpec | None = None


