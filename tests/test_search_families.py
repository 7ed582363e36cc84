"""``leanfm search`` on the other model families (issue 19): the space is the family's methods,
nothing is screened by the LM roofline, each trial is measured beside the baseline in one bench
run; tiny random diffusers pipeline and ONNX denoiser (the families' own test fixtures)."""
from __future__ import annotations

import json

import pytest

from leanfm import cli
from leanfm.search.space import SearchSpace

pytest.importorskip("optuna")
pytest.importorskip("diffusers")

from .test_diffusers_pipeline import sd_dir  # noqa: E402,F401 - the pipeline fixture
from .test_diffusion import tiny_unet_onnx  # noqa: E402,F401 - the ONNX UNet fixture


@pytest.fixture(scope="module")
def onnx_denoiser_dir(tiny_unet_onnx, tmp_path_factory):  # noqa: F811
    import shutil

    from leanfm.models.denoiser import DenoiserConfig

    d = tmp_path_factory.mktemp("denoiser")
    cfg = DenoiserConfig(onnx="unet.onnx", channels=1, size=16, cond_input="difficulty", conditions=[10, 50])
    shutil.copyfile(tiny_unet_onnx[1], d / cfg.onnx)
    cfg.save_pretrained(d)
    return d


def test_the_space_of_a_family_holds_its_searchable_methods_only():
    for family, expected in [("diffusion", {"deepcache", "onnx-int8", "sampling-steps"}),
                             ("diffusion-pipeline", {"deepcache", "dpm-solver", "hqq", "magnitude", "rtn", "sampling-steps",
                                                     "tome-unet"}),
                             ("vit", {"gptq", "hqq", "magnitude", "rtn", "sparsegpt", "tome", "token-prune", "wanda"})]:
        assert set(SearchSpace.from_methods(family=family).dims) == expected, family
    assert "gptq" in SearchSpace.from_methods().dims and "tome" not in SearchSpace.from_methods().dims


def _search(model, out, store, *extra):
    return cli.main(["search", "--model", str(model), "--out", str(out), "--store", str(store), "--samples", "2", "--steps", "2",
                     "--threads", "1", "--population", "2", *extra])


@pytest.mark.parametrize("which", ["pipeline", "denoiser"])
def test_search_measures_each_trial_beside_the_baseline_and_returns_a_front(which, request, tmp_path, capsys):
    model = request.getfixturevalue("sd_dir" if which == "pipeline" else "onnx_denoiser_dir")
    methods = "sampling-steps,tome-unet" if which == "pipeline" else "sampling-steps,deepcache"
    out, store = tmp_path / "s", tmp_path / "store.sqlite"
    code = _search(model, out, store, "--methods", methods, "--trials", "3", "--budget", "ssim>=0.01")
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "search.json").read_text())
    assert res["objectives"] == ["samples_per_s:max", "ssim:max"]  # the family's default objectives
    measured = [t for t in res["trials"] if t["status"] == "measured"]
    assert len(measured) >= 2 and res["counts"]["rejected"] == 0  # the LM predictor screens nothing here
    for t in measured:
        assert t["stage"] == 2 and t["predicted"] == {}
        assert {"samples_per_s", "ssim", "speedup"} <= set(t["metrics"])
        run = json.loads((out / "trials" / f"t{t['trial']:03d}" / "stage2" / "results.json").read_text())
        assert [r["recipe"]["name"] for r in run["runs"]][0] == "baseline" and len(run["runs"]) == 2  # side by side
    assert res["front"] and all(any(t["trial"] == n for t in measured) for n in res["front"])
    assert "Pareto set" in capsys.readouterr().out
    assert _search(model, out, store, "--methods", methods, "--trials", "3", "--budget", "ssim>=0.01") == 0
    assert json.loads((out / "search.json").read_text())["measured_now"] == 0  # resumed from the store


@pytest.mark.parametrize("methods,needle", [
    ("gptq", "method 'gptq' does not apply to a diffusion-pipeline model"),
    ("onnx-int8", "method 'onnx-int8' does not apply to a diffusion-pipeline model"),
])
def test_search_refuses_a_method_of_another_family_in_one_line(sd_dir, tmp_path, capsys, methods, needle):
    code = _search(sd_dir, tmp_path / "s", tmp_path / "st.sqlite", "--methods", methods, "--trials", "2")
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_group_sizes_are_drawn_to_divide_a_vit_s_linear_widths(tmp_path):
    from leanfm.search.run import _widths

    from .test_vision import tiny_dinov2

    tiny_dinov2().save_pretrained(tmp_path / "vit")  # hidden 32, mlp_ratio 2 (from its config alone)
    w = _widths(str(tmp_path / "vit"), "vit")
    assert w == {"in_features": [32, 64]}
    group = SearchSpace.from_methods(["rtn"], family="vit").dims["rtn"]["group_size"]
    assert 64 not in group.options(w) and 32 in group.options(w)  # 64 does not divide 32
    assert _widths(str(tmp_path / "vit"), "diffusion") == {}
