"""The recipe search space: declared per method, composed in order, narrowed by users."""
from __future__ import annotations

import pytest

from leanfm.config import config_class, config_from_dict, methods
from leanfm.errors import LeanfmError
from leanfm.search.space import ORDER, SearchSpace
from leanfm.space import Choice, Range, RandomSampler

SMOL = {"in_features": [576, 1536]}  # SmolLM2-135M's linear input widths


def test_every_declared_dimension_draws_valid_configs():
    """Each method's declared space only yields configs its own validation accepts."""
    searchable = [m for m in methods() if config_class(m).search_space]
    assert len(searchable) >= 15
    for m in searchable:
        space = SearchSpace.from_methods([m], require=[config_class(m).produces])
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
