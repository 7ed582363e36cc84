"""The recipe search space, built from the method declarations.

Every registered method whose config declares a ``search_space`` (:mod:`leanfm.space`) is a
candidate. Methods are grouped by what they produce, and a recipe takes at most one method per
group, in the composition order below: structure first (it changes the shapes the rest sees),
then pruning, low rank, quantization of what is left, and the KV-cache and decoding policies,
which run beside the weights. Each group may also be left out ("none").

Users narrow it with ``methods`` (``--methods gptq,awq,wanda``) or a YAML space::

    methods:
      gptq: {bits: [3, 4], group_size: [32, 64]}   # override a declared dimension
      wanda: {}                                    # as declared
      streaming_llm: {budget: [256, 512]}
    require: [int-weights]                         # groups that may not be left out
"""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..config import config_class, config_from_dict, methods as all_methods
from ..errors import LeanfmError
from ..recipe import Recipe, check_composition
from ..space import Dim, ReplaySampler, Sampler, Unrepresentable, none_safe, applies, dim_from_data, inherit

# what a step produces -> its place in a composed recipe (structure -> pruning -> low rank ->
# quantization of the linears, then of the embedding table; policies beside the weights; for
# image and diffusion models: an int8 graph, fewer tokens, then how the sampler runs)
ORDER = ("smaller-dense", "sparse-weights", "low-rank", "int-weights", "int-embeddings", "int8-graph", "token-reduction",
         "token-merging", "scheduler", "sampling-schedule", "feature-cache", "kv-policy", "decoding-policy")


@dataclass
class SearchSpace:
    """Per group (``produces``), the methods to draw from and their dimensions."""

    dims: dict[str, dict[str, Dim]]  # method -> parameter -> dimension
    require: tuple[str, ...] = ()
    seed: int = 0
    groups: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        self.groups = {}
        for m in sorted(self.dims):
            self.groups.setdefault(config_class(m).produces, []).append(m)
        unknown = [g for g in self.require if g not in ORDER]
        if unknown:
            raise LeanfmError(f"require names unknown groups {unknown}; groups: {', '.join(ORDER)}")
        missing = [g for g in self.require if g not in self.groups]
        if missing:
            raise LeanfmError(f"require {missing}, but no method of the space produces it; add one to methods")

    @classmethod
    def from_methods(cls, names: list[str] | None = None, require=(), seed: int = 0,
                     family: str = "causal-lm") -> "SearchSpace":
        """All searchable methods of the model ``family``, or just ``names`` (each must declare a
        search space and apply to the family)."""
        from ..config import check_family

        searchable = {m: dict(config_class(m).search_space) for m in all_methods()
                      if config_class(m).search_space and family in config_class(m).families}
        if names is None:
            if not searchable:
                raise LeanfmError(f"no method that applies to a {family} model declares a search space; nothing to search")
            return cls(searchable, tuple(require), seed)
        out = {}
        for n in names:
            check_family(config_class(n), family)  # unknown method: the registry's one-line error with the known names
            if n not in searchable:
                raise LeanfmError(f"method {n} declares no search space; searchable methods: {', '.join(sorted(searchable))}")
            out[n] = searchable[n]
        return cls(out, tuple(require), seed)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<space>") -> "SearchSpace":
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise LeanfmError(f"search space {source} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or not data["methods"]:
            raise LeanfmError(f"search space {source} needs a 'methods:' mapping of method -> dimensions")
        extra = set(data) - {"methods", "require", "seed"}
        if extra:
            raise LeanfmError(f"search space {source} has unknown keys {sorted(extra)}; use methods, require, seed")
        base = cls.from_methods(list(data["methods"]))
        dims = {}
        for m, over in data["methods"].items():
            over = over or {}
            if not isinstance(over, dict):
                raise LeanfmError(f"search space {source}: {m} must map parameters to choices or ranges")
            fields = {p["name"] for p in config_class(m).describe()["parameters"]}
            bad = set(over) - fields
            if bad:
                raise LeanfmError(f"search space {source}: {m} has no parameter {sorted(bad)}; its parameters: {', '.join(sorted(fields))}")
            dims[m] = {**base.dims[m], **{p: inherit(dim_from_data(p, v, f"search space {source}, {m}"), base.dims[m].get(p))
                                          for p, v in over.items()}}
        return cls(dims, tuple(data.get("require") or ()), int(data.get("seed", 0)))

    def sample(self, sampler: Sampler, widths: dict[str, list[int]] | None = None, name: str = "candidate") -> Recipe:
        """One recipe: per group in ORDER, whether it is used (unless required), which method, then
        its parameters. Raises
        LeanfmError when the drawn combination fails a config's own validation."""
        steps = []
        for group in ORDER:
            ms = self.groups.get(group)
            if not ms:
                continue
            # each group is used with probability 1/2 whatever its number of methods (a "none" among
            # the methods would stack groups with many methods far more often than it leaves them out)
            if group not in self.require and not sampler.suggest_categorical(f"{group}:used", [False, True]):
                continue
            m = sampler.suggest_categorical(group, ms)
            drawn: dict = {}
            for p, dim in self.dims[m].items():
                if applies(dim, drawn):
                    drawn[p] = dim.draw(sampler, f"{m}.{p}", widths)
            steps.append(config_from_dict({"method": m, **drawn}, where=f"{name}: "))
        recipe = Recipe(name=name, seed=self.seed, steps=steps, description="drawn by leanfm search")
        check_composition(recipe)
        return recipe

    def params_of(self, recipe: Recipe, widths: dict[str, list[int]] | None = None) -> dict | None:
        """The sampler parameters under which :meth:`sample` draws exactly ``recipe``'s steps, or
        None when this space cannot draw it (a method it lacks, two steps of one group, steps out
        of the composition order, a value outside a dimension, a parameter the space does not vary
        set away from its default)."""
        by_group: dict = {}
        for st in recipe.steps:
            if st.produces in by_group:
                return None
            by_group[st.produces] = st
        wanted = {}
        for g, st in by_group.items():
            wanted[f"{g}:used"], wanted[g] = True, st.method
            wanted.update({f"{st.method}.{k}": none_safe(v) for k, v in st.to_dict().items() if k != "method"})

        def answer(name):
            if name.endswith(":used") and name not in wanted:
                return False
            if name not in wanted:
                raise Unrepresentable(f"{name} is not set by the recipe")
            return wanted[name]

        replay = ReplaySampler(answer)
        try:
            drawn = self.sample(replay, widths, name=recipe.name)
        except LeanfmError:  # Unrepresentable, or the drawn combination fails a config's validation
            return None
        same = [s.to_dict() for s in drawn.steps] == [s.to_dict() for s in recipe.steps]
        return replay.params if same else None

    def size(self) -> dict[str, int]:
        """Methods per group (for the search's header line)."""
        return {g: len(ms) for g, ms in self.groups.items()}
