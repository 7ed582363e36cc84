"""Recipes and configs: built-ins, validation, and errors that name file and line."""
import pytest

import leanfm
from leanfm.config import config_from_dict
from leanfm.errors import LeanfmError
from leanfm.recipe import builtin_names, load_recipe, parse_recipe


def test_builtins_exist_and_parse():
    names = builtin_names()
    for n in ("baseline", "rtn-w8", "rtn-w4", "rtn-w4g64"):
        assert n in names
        r = load_recipe(n)
        assert r.name == n
    assert load_recipe("baseline").steps == []
    w4g = load_recipe("rtn-w4g64").steps[0]
    assert (w4g.bits, w4g.group_size) == (4, 64)
    assert load_recipe("rtn-w4").steps[0].group_size is None


def test_roundtrip(tmp_path):
    r = load_recipe("rtn-w4g64")
    p = r.save(tmp_path / "r.yaml")
    r2 = load_recipe(str(p))
    assert r2.to_dict() == r.to_dict()


@pytest.mark.parametrize("text,pattern", [
    ("name: x\nsteps:\n  - {method: rtn, bits: 4\n", r"line \d+: malformed YAML"),
    ("name: x\nsteps:\n  - {method: nope}\n", r"line 3: unknown method 'nope'"),
    ("name: x\nseed: 0\nsteps:\n  - {method: rtn, bits: 4}\n  - {method: rtn, bitz: 4}\n", r"line 5: unknown parameter 'bitz' for method rtn"),
    ("name: x\nsteps:\n  - {method: rtn, bits: four}\n", r"line 3: parameter 'bits' of method rtn must be int"),
    ("name: x\nsteps:\n  - {method: rtn, bits: 12}\n", r"line 3: bits=12 is not supported"),
    ("name: x\nstepz: []\n", r"line 2: unknown key 'stepz'"),
    ("name: x\nseed: abc\nsteps: []\n", r"line 2: seed must be an integer"),
    ("- just a list\n", r"line 1: expected a mapping"),
])
def test_bad_recipes(text, pattern):
    with pytest.raises(LeanfmError, match=pattern):
        parse_recipe(text, "bad.yaml")


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(LeanfmError, match="built-in recipes: .*rtn-w8"):
        load_recipe("no-such-recipe")


def test_config_from_dict_and_apply_records_flags():
    from tests.conftest import tiny_llama

    m = tiny_llama()
    cfg = config_from_dict({"method": "rtn", "bits": 8})
    assert isinstance(cfg, leanfm.RTNConfig)
    leanfm.apply_(m, cfg)
    step = m.leanfm_info["steps"][0]
    assert step["method"] == "rtn" and step["simulated"] is False and "int8pack" in step["kernel"]
    m2 = tiny_llama()
    leanfm.apply_(m2, config_from_dict({"method": "rtn", "bits": 8, "backend": "fake"}))
    assert m2.leanfm_info["steps"][0]["simulated"] is True


def test_rtn_apply_quantizes_all_linears_but_lm_head():
    import torch

    from tests.conftest import tiny_llama

    m = tiny_llama(tie=False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    leanfm.apply_(m, leanfm.RTNConfig(bits=2, group_size=16))
    for n, p in m.named_parameters():
        changed = not torch.equal(before[n], p)
        if n.endswith("proj.weight"):
            assert changed and p.unique().numel() <= 4 * p.shape[0] * (p.shape[1] // 16), n
        else:
            assert not changed, n  # embeddings, norms, lm_head untouched


def test_bad_group_size_leaves_model_untouched():
    import torch

    from tests.conftest import tiny_llama

    m = tiny_llama(hidden=96)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(LeanfmError, match="does not divide in_features 96 of layer model.layers.0"):
        leanfm.apply_(m, leanfm.RTNConfig(bits=4, group_size=64))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
