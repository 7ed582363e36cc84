"""What a recipe does to the cost of running a model: weight formats, shapes, KV cache, decoding.

Each recipe step becomes an *effect* the roofline can price, without touching any weights:

- weight quantization (rtn, gptq, awq, hqq, smoothquant, sparsegpt with ``bits``): bits, group
  size, symmetry, activation bits, and which execution backend holds the packed codes
  (``fake`` and sparsegpt's joint quantization are simulated: fp32 values, no bytes saved);
- pruning (magnitude, wanda, sparsegpt): sparsity, pattern (unstructured or N:M) and backend
  (``masked``: zeros in a dense weight, simulated; ``csr``: a real sparse kernel);
- low rank (svd, asvd): each linear becomes two (in -> r, r -> out) when that saves parameters;
- structure: layerdrop (fewer layers), width (fewer KV groups / MLP channels);
- KV cache: streaming_llm / h2o / snapkv budgets, kv_quant bits and groups (one policy per model:
  a later one replaces an earlier one);
- decoding: speculative (draft, k); early_exit is listed as not modelled.

Which linears a step touches follows ``methods/targets.py``: ``skip`` / ``only`` fnmatch patterns
on the full module name and its last component (``lm_head`` skipped by default, so ``int4-fast``'s
second step ``only: [lm_head], skip: []`` is what quantizes the head). Steps apply in order: a
packed layer (real quantization, CSR) is no longer an ``nn.Linear`` and later steps pass over it;
low rank on a masked layer leaves dense factors.

Recipes are read without importing the method implementations (they load torch): when the
method registry is already loaded the recipe is validated with ``load_recipe``; otherwise
``load_recipe`` reads it keeping each step as its mapping (``recipe.raw_step``), and the
defaults in :data:`DEFAULTS` fill the fields it omits (a test keeps those equal to the config
dataclasses').
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import LeanfmError
from ..methods.lowrank.rank import rank_for, saves_params
from ..methods.selection import selected
from .arch import Arch

_SKIP = ("lm_head",)
_QUANT = {"bits": 4, "group_size": None, "symmetric": True, "skip": _SKIP, "only": (), "backend": "auto"}
_PRUNE = {"sparsity": None, "pattern": "unstructured", "skip": _SKIP, "only": (), "backend": "masked"}
_LOWRANK = {"param_ratio": 0.7, "rank_ratio": None, "rank": None, "skip": _SKIP, "only": ()}
# Defaults of the config fields read here, per method (tests/test_predict.py checks each against
# the method's dataclass, so a changed default there fails a test rather than skewing predictions).
DEFAULTS: dict[str, dict] = {
    "rtn": {**_QUANT, "bits": 8},
    "gptq": dict(_QUANT),
    "awq": {**_QUANT, "symmetric": False},
    "hqq": {**_QUANT, "symmetric": False},
    "smoothquant": {**_QUANT, "bits": 8, "act_bits": 8},
    "magnitude": dict(_PRUNE),
    "wanda": dict(_PRUNE),
    "sparsegpt": {**_PRUNE, "bits": None, "group_size": None, "symmetric": True},
    "layerdrop": {"fraction": None, "count": None},
    "width": {"heads_fraction": 0.0, "mlp_fraction": 0.0},
    "svd": dict(_LOWRANK),
    "asvd": dict(_LOWRANK),
    "streaming_llm": {"budget": 512, "sinks": 4},
    "h2o": {"budget": 512},
    "snapkv": {"budget": 1024, "window": 32},
    "kv_quant": {"bits": 8, "group_size": 32, "key_axis": "token", "value_axis": "token"},
    "speculative": {"draft": "self", "k": 4, "skip_layers": None, "skip_fraction": None},
    "early_exit": {},
}
_QUANT_METHODS = ("rtn", "gptq", "awq", "hqq", "smoothquant")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ----------------------------------------------------------------- effect records


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
    unmodelled: list[str] = field(default_factory=list)

    def structure(self, arch: Arch) -> Arch:
        """The architecture after width pruning and layer dropping (same rounding as the methods)."""
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
                if isinstance(spec, QuantSpec):
                    pc.quant, pc.packed = spec, not spec.simulated
                elif isinstance(spec, SparsitySpec):
                    pc.sparsity, pc.packed = spec, spec.backend == "csr"
                    if spec.method == "sparsegpt" and isinstance(getattr(rule, "joint", None), QuantSpec):
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
class JointRule(Rule):
    """sparsegpt with ``bits``: masked sparsity plus fake-quantized kept weights."""

    joint: QuantSpec | None = None


# ----------------------------------------------------------------- reading recipes


def _steps(recipe) -> tuple[str, list[tuple[str, dict]]]:
    """``(recipe name, [(method, params with defaults)])`` for a name, path, Recipe or step list."""
    if isinstance(recipe, (list, tuple)):
        return "custom", [_as_step(s) for s in recipe]
    if hasattr(recipe, "steps") and hasattr(recipe, "name"):
        return recipe.name, [_as_step(s) for s in recipe.steps]
    from ..config import _REGISTRY  # populated once the method implementations are imported
    from ..recipe import load_recipe, raw_step

    # validated configs when the methods are loaded anyway; else the checked step mappings
    r = load_recipe(str(recipe)) if _REGISTRY else load_recipe(str(recipe), build_step=raw_step)
    return r.name, [_as_step(s) for s in r.steps]


def _as_step(step) -> tuple[str, dict]:
    d = step if isinstance(step, dict) else step.to_dict()
    d = dict(d)
    method = str(d.pop("method", ""))
    if method not in DEFAULTS:
        raise LeanfmError(f"unknown method '{method}' in recipe; the predictor models: {', '.join(sorted(DEFAULTS))}")
    return method, {**DEFAULTS[method], **d}


def _nm(pattern) -> tuple[int, int] | None:
    if isinstance(pattern, str) and pattern.strip().lower() == "unstructured":
        return None
    m = _NM.match(str(pattern))
    if not m or not 1 <= int(m.group(1)) < int(m.group(2)):
        raise LeanfmError(f"pattern {pattern!r} is malformed; use 'unstructured' or N:M such as '2:4' (quoted in YAML)")
    return int(m.group(1)), int(m.group(2))


def _tuple(v) -> tuple[str, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (str(v),)


def recipe_effects(recipe="baseline") -> Effects:
    """Effects of a recipe given by built-in name, ``a+b`` composition, YAML path, Recipe or step list."""
    name, steps = _steps(recipe)
    eff = Effects(recipe=name, steps=[m for m, _ in steps])
    for method, p in steps:
        skip, only = _tuple(p.get("skip", _SKIP)), _tuple(p.get("only", ()))
        if method in _QUANT_METHODS:
            spec = QuantSpec(method, int(p["bits"]), p["group_size"] if p["group_size"] not in (None, -1) else None, bool(p["symmetric"]),
                             str(p["backend"]), int(p["act_bits"]) if method == "smoothquant" else None,
                             fractional_zero=method == "hqq", simulated=p["backend"] == "fake")
            eff.rules.append(Rule(spec, skip, only))
        elif method in ("magnitude", "wanda", "sparsegpt"):
            nm = _nm(p["pattern"])
            s = 1 - nm[0] / nm[1] if nm else (0.5 if p["sparsity"] is None else float(p["sparsity"]))
            spec = SparsitySpec(method, s, nm, str(p["backend"]))
            joint = None
            if method == "sparsegpt" and p.get("bits") is not None:
                joint = QuantSpec("sparsegpt", int(p["bits"]), p.get("group_size"), bool(p.get("symmetric", True)), "fake", simulated=True)
            eff.rules.append(JointRule(spec, skip, only, joint=joint) if joint else Rule(spec, skip, only))
        elif method in ("svd", "asvd"):
            eff.rules.append(Rule(LowRankSpec(method, p["param_ratio"], p["rank_ratio"], p["rank"]), skip, only))
        elif method == "layerdrop":
            eff.drop = (p["fraction"], p["count"])
        elif method == "width":
            eff.width = (float(p["heads_fraction"]), float(p["mlp_fraction"]))
        elif method == "streaming_llm":
            eff.kv = KVSpec(method, budget=int(p["budget"]), sinks=int(p["sinks"]))
        elif method == "h2o":
            eff.kv = KVSpec(method, budget=int(p["budget"]))
        elif method == "snapkv":
            eff.kv = KVSpec(method, budget=int(p["budget"]), prompt_only=True)
        elif method == "kv_quant":
            eff.kv = KVSpec(method, bits=int(p["bits"]), group_size=p["group_size"], key_axis=p["key_axis"], value_axis=p["value_axis"])
        elif method == "speculative":
            skip_layers = p.get("skip_layers")
            eff.speculative = SpecDecode(str(p["draft"]), int(p["k"]), len(skip_layers) if skip_layers else None, p.get("skip_fraction"))
        elif method == "early_exit":
            eff.unmodelled.append("early_exit is not modelled (its exit layer depends on the text): predicted as plain decoding")
    return eff
