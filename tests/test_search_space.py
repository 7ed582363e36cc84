"""The recipe search space: declared per method, composed in order, narrowed by users."""
from __future__ import annotations

import pytest

from leanfm.config import config_class, config_from_dict, methods
from leanfm.errors import LeanfmError
from leanfm.recipe import load_recipe
from leanfm.search.space import ORDER, SearchSpace
from leanfm.space import Choice, Range, RandomSampler

SMOL = {"in_features": [576, 1536]}  # SmolLM2-135M's linear input widths


def test_every_declared_dimension_draws_valid_configs():
    """Each method's declared space only yields configs its own validation accepts."""
    searchable = [m for m in methods() if config_class(m).search_space]
    assert len(searchable) >= 15
    for m in searchable:
        space = SearchSpace.from_methods([m], require=[config_class(m).produces], family=config_class(m).families[0])
        for seed in range(40):
            r = space.sample(RandomSampler(seed), SMOL)
            assert [s.method for s in r.steps] == [m]


def test_declared_spaces_use_only_real_parameters():
    for m in methods():
        cls = config_class(m)
        names = {p["name"] for p in cls.describe()["parameters"]}
        assert set(cls.search_space) <= names, m
        for dim in cls.search_space.values():
            assert set(dim.when) <= names, m


def test_recipes_follow_the_composition_order_and_cover_the_space():
    space = SearchSpace.from_methods(["layerdrop", "wanda", "gptq", "streaming_llm"])
    seen_groups, seen_methods = set(), set()
    for seed in range(200):
        r = space.sample(RandomSampler(seed), SMOL)
        order = [ORDER.index(s.produces) for s in r.steps]
        assert order == sorted(order) and len(set(order)) == len(order)
        seen_methods |= {s.method for s in r.steps}
        seen_groups.add(len(r.steps))
    assert seen_methods == {"layerdrop", "wanda", "gptq", "streaming_llm"}
    assert seen_groups == {0, 1, 2, 3, 4}  # "none" per group is reachable too


def test_conditional_and_divisibility_dimensions():
    space = SearchSpace.from_methods(["wanda"], require=["sparse-weights"])
    for seed in range(60):
        st = space.sample(RandomSampler(seed)).steps[0]
        if st.pattern == "2:4":
            assert st.sparsity is None  # sparsity is drawn only for unstructured
        else:
            assert 0.1 <= st.sparsity <= 0.6 and round(st.sparsity / 0.05, 6) % 1 == 0
    assert Choice(32, 64, None, divides="in_features").options({"in_features": [96, 576]}) == (32, None)
    gptq = SearchSpace.from_methods(["gptq"], require=["int-weights"])
    sizes = {gptq.sample(RandomSampler(s), {"in_features": [100]}).steps[0].group_size for s in range(30)}
    assert sizes == {None}


def test_same_seed_same_recipe():
    space = SearchSpace.from_methods()
    a = [space.sample(RandomSampler(7), SMOL).to_dict() for _ in range(2)]
    assert a[0] == a[1]


def test_yaml_space_overrides_and_requires():
    space = SearchSpace.from_yaml("methods:\n  gptq: {bits: [3], group_size: [64]}\n  wanda: {sparsity: {low: 0.2, high: 0.3, step: 0.1}}\n"
                                  "require: [int-weights]\nseed: 3\n")
    for s in range(30):
        r = space.sample(RandomSampler(s), SMOL)
        q = [st for st in r.steps if st.method == "gptq"]
        assert len(q) == 1 and q[0].bits == 3 and q[0].group_size == 64 and r.seed == 3
        for st in r.steps:
            if st.method == "wanda" and st.pattern == "unstructured":
                assert st.sparsity in (0.2, 0.3)


@pytest.mark.parametrize("text,needle", [
    ("methods: [gptq]", "needs a 'methods:' mapping"),
    ("methods:\n  gptqq: {}", "unknown method 'gptqq'"),
    ("methods:\n  gptq: {bitz: [3]}", "gptq has no parameter ['bitz']"),
    ("methods:\n  gptq: {bits: {low: 3}}", "must be a list of choices or {low: .., high: ..}"),
    ("methods:\n  gptq: {}\nrequire: [kv-policy]", "no method of the space produces it"),
    ("methods:\n  gptq: {}\nbudget: 3", "unknown keys ['budget']"),
    ("methods: {gptq: [}", "not valid YAML"),
])
def test_bad_spaces_are_one_line_errors(text, needle):
    with pytest.raises(LeanfmError) as e:
        SearchSpace.from_yaml(text, "s.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_method_without_a_space_is_named():
    unsearchable = [m for m in methods() if not config_class(m).search_space]
    if unsearchable:
        with pytest.raises(LeanfmError, match="declares no search space"):
            SearchSpace.from_methods([unsearchable[0]])


def test_dimension_validation():
    with pytest.raises(LeanfmError):
        Range(1.0, 0.5)
    with pytest.raises(LeanfmError):
        Choice()
    assert config_from_dict({"method": "gptq", "bits": 3}).bits == 3


def test_params_of_replays_a_recipe_through_optuna_exactly():
    """A built-in recipe (or a+b) the space can draw is found as sampler parameters which, enqueued
    in Optuna, make ``sample`` draw exactly its steps; one it cannot draw gives None."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_methods()
    names = ["gptq-w4g64+emb8", "wanda50+rtn-w4g64", "layerdrop25", "kv-int8", "streamingllm512", "rtn-w3"]
    study = optuna.create_study(sampler=optuna.samplers.NSGAIISampler(seed=0), directions=["minimize"])
    for n in names:
        params = space.params_of(load_recipe(n), SMOL)
        assert params is not None, n
        study.enqueue_trial(params)
    for n in names:
        drawn = space.sample(study.ask(), SMOL, name="t")
        assert [s.to_dict() for s in drawn.steps] == [s.to_dict() for s in load_recipe(n).steps], n
    # int4-fast quantizes twice; kv-int4 sets key_axis, which the space does not vary; group 128 does not divide 576
    for n in ["int4-fast", "kv-int4", "gptq-w4g128", "early-exit"]:
        assert space.params_of(load_recipe(n), SMOL) is None, n
    assert SearchSpace.from_methods(["rtn"]).params_of(load_recipe("gptq-w4g64"), SMOL) is None  # method not in the space
    narrowed = SearchSpace.from_yaml("methods:\n  rtn: {bits: [4]}\n")
    assert narrowed.params_of(load_recipe("rtn-w8"), SMOL) is None and narrowed.params_of(load_recipe("rtn-w4"), SMOL)


def test_warm_start_picks_builtins_the_predictor_lets_through_gentlest_first():
    from leanfm.search.budget import parse_budget
    from leanfm.search.seeds import pick

    space = SearchSpace.from_methods(["rtn", "gptq", "layerdrop", "embed_quant"])
    bytes_of = {"rtn-w8": 0.25, "rtn-w4": 0.14, "layerdrop25": 0.75}

    def price(recipe):  # a stand-in predictor: bytes multiply, per step
        v = 1.0
        for s in recipe.name.split("+"):
            v *= bytes_of.get(s, 0.9)
        return {"weight_bytes": v}

    seeds = pick(space, SMOL, price, parse_budget("weight_bytes<=0.3x"), {"weight_bytes": 1.0}, limit=20)
    names = [n for n, _ in seeds]
    assert names[:2] == ["rtn-w8", "rtn-w4"]  # single steps first, more bytes kept first
    assert all(price(load_recipe(n))["weight_bytes"] <= 0.3 * 1.02 for n in names)
    pairs = names[names.index("rtn-w4") + 1:]
    assert pairs and all("+" in n for n in pairs) and "layerdrop25" not in names
    removing = [i for i, n in enumerate(pairs) if n.startswith("layerdrop25+")]
    assert removing and min(removing) > max(i for i, n in enumerate(pairs) if not n.startswith("layerdrop25+"))
    assert len(pick(space, SMOL, price, parse_budget("weight_bytes<=0.3x"), {"weight_bytes": 1.0}, limit=3)) == 3
