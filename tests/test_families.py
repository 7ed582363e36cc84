"""Model families (issue 19): methods declare the families they apply to, apply_ and bench refuse
the others in one line naming the family and the methods that apply, and `leanfm bench` measures
a vision transformer (images/s, k-NN / probe accuracy, feature cosine) in the results schema."""
from __future__ import annotations

import json

import pytest
import torch

import leanfm
from leanfm import cli
from leanfm.config import config_class, methods, methods_for
from leanfm.errors import LeanfmError
from leanfm.models.family import FAMILIES, family_of

from .test_cli import assert_one_line_error, run_cli
from .test_vision import _idx, tiny_dinov2


def test_every_method_declares_known_families_and_vit_has_its_own():
    for m in methods():
        fams = config_class(m).families
        assert fams and set(fams) <= set(FAMILIES), (m, fams)
    vit = methods_for("vit")
    assert {"tome", "rtn", "hqq", "magnitude"} <= set(vit)
    assert {"gptq", "wanda", "sparsegpt"} <= set(vit) and "awq" not in vit and "tome" not in methods_for("causal-lm")
    assert config_class("tome").describe()["families"] == ["vit", "clip"]
    assert {"tome", "rtn", "hqq", "magnitude"} <= set(methods_for("clip"))


def test_family_of_reads_the_config_and_a_loaded_models_record():
    from .conftest import tiny_llama

    assert family_of(tiny_dinov2()) == "vit" and family_of(tiny_llama()) == "causal-lm"
    assert family_of(torch.nn.Linear(2, 2)) == "causal-lm"  # stub models stand for causal LMs


def test_a_method_of_another_family_is_refused_in_one_line_naming_the_family_and_the_methods_that_apply():
    from .conftest import tiny_llama

    with pytest.raises(LeanfmError) as e:
        leanfm.apply_(tiny_dinov2(), {"method": "awq", "bits": 4})
    msg = str(e.value)
    assert "\n" not in msg and "vit model" in msg and "methods for vit models:" in msg and "tome" in msg and "rtn" in msg
    with pytest.raises(LeanfmError, match="'tome' does not apply to a causal-lm model"):
        leanfm.apply_(tiny_llama(), {"method": "tome", "r": 2})


@pytest.mark.parametrize("step", [{"method": "rtn", "bits": 8, "group_size": 16}, {"method": "hqq", "bits": 4, "group_size": 16},
                                  {"method": "magnitude", "sparsity": 0.3}], ids=["rtn", "hqq", "magnitude"])
def test_the_llm_weight_methods_run_on_a_vits_linears(step):
    model = tiny_dinov2(image=28, patch=4)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    leanfm.apply_(model, step)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.encoder.modules()) or step["method"] == "magnitude"
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min()
    assert 0.8 < cos < 1.0, cos  # changed, and still the same features in direction


def test_tome_as_a_method_records_the_tokens_each_block_runs_on():
    model = tiny_dinov2(image=28, patch=4, layers=3)  # 1 + 49 tokens
    leanfm.apply_(model, {"method": "tome", "r": 5, "image_size": 28})
    step = model.leanfm_info["steps"][-1]
    assert step["tokens_per_block"] == [50, 45, 40] and step["simulated"] is False
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 28, 28))
    assert model.leanfm_tome.size.shape[1] == 50 - 3 * 5
    with pytest.raises(LeanfmError, match="tome r=-1 must be an integer >= 0"):
        leanfm.apply_(tiny_dinov2(), {"method": "tome", "r": -1})


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-vit")
    tiny_dinov2(image=28, patch=4, layers=3).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A stand-in Fashion-MNIST: class c is a bright square at a class-specific place."""
    from leanfm.data import images

    root = tmp_path_factory.mktemp("data")
    (root / "fashion-mnist").mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("test", 100)):
        labels = torch.arange(10).repeat(n // 10)
        imgs = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            r, col = divmod(c, 5)
            imgs[i, 4 + 10 * r: 12 + 10 * r, 1 + 5 * col: 5 + 5 * col] = 250
        _idx(root / "fashion-mnist" / images._FILES[split][0], imgs)
        _idx(root / "fashion-mnist" / images._FILES[split][1], labels.to(torch.uint8))
    return root


def _bench_args(vit_dir, fashion_dir, out, *extra):
    return ["bench", "--model", str(vit_dir), "--data-dir", str(fashion_dir), "--image-size", "28", "--train-per-class", "8",
            "--test-per-class", "4", "--repeats", "2", "--threads", "1", "--out", str(out), *extra]


def test_bench_measures_a_vision_model_into_the_results_schema(vit_dir, fashion_dir, tmp_path, capsys):
    recipe = tmp_path / "tome2.yaml"
    recipe.write_text("name: tome2\nseed: 0\nsteps:\n  - {method: tome, r: 2, image_size: 28}\n")
    code, out, err = run_cli(_bench_args(vit_dir, fashion_dir, tmp_path / "run", "--recipe", "baseline", "--recipe", str(recipe),
                                         "--recipe", "rtn-w8", "--recipe", "magnitude50"), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    leanfm.results.validate(res)
    base, tome, rtn, pruned = res["runs"]
    for run in res["runs"]:
        m = run["metrics"]
        assert 0 <= m["knn_accuracy"] <= 1 and 0 <= m["linear_probe_accuracy"] <= 1 and m["images_per_s"] > 0
        assert m["ms_per_image"] == pytest.approx(1e3 / m["images_per_s"])
        assert run["details"]["eval_images"] == {"train": 80, "test": 40}
    # the cosine is to the baseline's features: 1 for the baseline itself, less for half the weights zeroed
    assert base["metrics"]["feature_cosine"] == pytest.approx(1.0) and pruned["metrics"]["feature_cosine"] < 0.999
    assert pruned["flags"]["simulated"] is True and base["flags"]["simulated"] is False
    assert base["metrics"]["knn_accuracy"] > 0.2  # above the 10% chance level, even from a random tiny ViT
    assert rtn["metrics"]["weight_bytes"] < base["metrics"]["weight_bytes"]
    assert tome["details"]["steps"][0]["tokens_per_block"] == [50, 48, 46]
    # the roofline's latency per image, for the plain model and ToMe; other steps are not priced
    for run in (base, tome):
        m = run["metrics"]
        assert m["predicted_ms_per_image"] > 0
        assert m["ms_per_image_prediction_error_pct"] == pytest.approx((m["predicted_ms_per_image"] / m["ms_per_image"] - 1) * 100)
    assert tome["metrics"]["predicted_ms_per_image"] < base["metrics"]["predicted_ms_per_image"]
    assert tome["metrics"]["speedup"] == pytest.approx(tome["metrics"]["images_per_s"] / base["metrics"]["images_per_s"])
    assert "predicted_ms_per_image" not in rtn["metrics"] and "rtn" in rtn["details"]["prediction"]["error"]
    assert "k-NN acc" in out and "images/s" in out and "fashion-mnist" in out


@pytest.mark.parametrize("extra,needles", [
    (["--image-size", "30"], ["--image-size 30 is not a multiple of the model's patch size 4", "use 28 or 32"]),
    (["--recipe", "awq-w4g64"], ["recipe awq-w4g64: method 'awq' does not apply to a vit model", "methods for vit models:",
                                 "tome", "gptq"]),
    (["--recipe", "@tome30"], ["recipe tome30:", "ToMe r=30 merges more tokens than block 0 has left (50 of 50 tokens at 28x28)",
                               "use r <= "]),
    (["--recipe", "tome-r8"], ["tome is checked for 224x224 images but --image-size is 28"]),
], ids=["patch-does-not-divide", "method-of-another-family", "r-too-large", "tome-size-differs"])
def test_bench_refuses_bad_vision_input_in_one_line(vit_dir, fashion_dir, tmp_path, capsys, extra, needles):
    args = _bench_args(vit_dir, fashion_dir, tmp_path / "run")
    if "--image-size" in extra:
        i = args.index("--image-size")
        del args[i:i + 2]
    if "@tome30" in extra:
        (tmp_path / "tome30.yaml").write_text("name: tome30\nseed: 0\nsteps:\n  - {method: tome, r: 30, image_size: 28}\n")
        extra = [str(tmp_path / "tome30.yaml") if e == "@tome30" else e for e in extra]
    code, _, err = run_cli(args + extra, capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run" / "results.json").exists()  # refused before any measuring


def test_the_vit_predictor_prices_an_image_as_the_prefill_of_its_tokens():
    from leanfm.predict.analyzer import predict
    from leanfm.predict.vit import as_decoder, predict_vit

    cfg = {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
           "patch_size": 14, "qkv_bias": True}
    dec = as_decoder(cfg)
    assert (dec["intermediate_size"], dec["gated_mlp"], dec["vocab_size"]) == (1536, False, 1)
    plain = predict_vit(cfg, "local", 8, 224)
    assert plain["tokens_per_block"] == [257] * 12
    assert plain["ms_per_image"] == pytest.approx(predict(dec, "baseline", "local", batch=8, prompt=257, gen=1)["prefill_ms"] / 8)
    merged = predict_vit(cfg, "local", 8, 224, r=16)
    assert merged["tokens_per_block"][-1] == 257 - 11 * 16 and merged["ms_per_image"] < 0.8 * plain["ms_per_image"]
    # about 2 x 22M multiply-adds per token: 257 tokens ~ 11 GFLOP per image
    assert 9e9 < plain["flops_per_image"] < 13e9
    with pytest.raises(LeanfmError, match="not a multiple of the patch size 14"):
        predict_vit(cfg, "local", 8, 230)


@pytest.mark.parametrize("recipe", ["rtn-w8", "@hqq-w4g16", "magnitude50", "@gptq-w4g16"])
def test_compress_writes_a_vit_checkpoint_that_loads_back_with_its_weights(vit_dir, fashion_dir, tmp_path, capsys, recipe):
    import leanfm
    from leanfm.data.images import calibration_images
    from leanfm.kernels.qlinear import QuantLinear

    if recipe.startswith("@"):  # the tiny ViT is 32 wide: groups of 16
        method = recipe[1:].split("-")[0]
        path = tmp_path / f"{recipe[1:]}.yaml"
        path.write_text(f"name: {recipe[1:]}\nseed: 0\nsteps:\n  - {{method: {method}, bits: 4, group_size: 16}}\n")
        recipe = str(path)
    code, out, err = run_cli(["compress", "--model", str(vit_dir), "--recipe", recipe, "--out", str(tmp_path / "ck"),
                              "--threads", "1", "--data-dir", str(fashion_dir)], capsys)
    assert code == 0, err
    assert "saved " in out and (tmp_path / "ck" / "recipe.yaml").is_file()
    ref, _ = leanfm.load(str(vit_dir))
    calib = calibration_images(8, 28, 0, fashion_dir) if "gptq" in recipe else None  # what compress calibrated on
    leanfm.apply_(ref, recipe, calib=calib)  # the same recipe in memory
    back, tok = leanfm.load(str(tmp_path / "ck"))
    assert tok is None and back.leanfm_info["family"] == "vit" and type(back).__name__ == type(ref).__name__
    assert any(isinstance(m, QuantLinear) for m in back.modules()) == (recipe != "magnitude50")  # pruned: dense zeros
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_compress_says_token_reduction_is_not_in_the_weights_and_refuses_other_families(vit_dir, tmp_path, capsys):
    steps = tmp_path / "tome-rtn.yaml"
    steps.write_text("name: tr\nseed: 0\nsteps:\n  - {method: rtn, bits: 8}\n  - {method: tome, r: 2, image_size: 28}\n")
    code, out, err = run_cli(["compress", "--model", str(vit_dir), "--recipe", str(steps), "--out", str(tmp_path / "ck")],
                             capsys)
    assert code == 0, err
    assert "not in the weights: tome" in out
    code, _, err = run_cli(["compress", "--model", str(vit_dir), "--recipe", "rtn-w8", "--format", "gguf",
                            "--out", str(tmp_path / "g")], capsys)
    assert_one_line_error(code, err, "a ViT is written in leanfm's own format; --format gguf is for causal LMs")
    code, _, err = run_cli(["compress", "--model", str(vit_dir), "--recipe", "awq-w4g64", "--out", str(tmp_path / "q")], capsys)
    assert_one_line_error(code, err, "method 'awq' does not apply to a vit model")
    assert not (tmp_path / "g").exists() and not (tmp_path / "q").exists()


def test_predict_prices_a_vit_folder_per_image_and_tome_shrinks_it(vit_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    code, text, err = run_cli(["predict", "--model", str(vit_dir), "--recipe", "rtn-w8", "--image-size", "28", "--batch", "2",
                               "--json", str(out)], capsys)
    assert code == 0, err
    base = json.loads(out.read_text())
    assert base["family"] == "vit" and base["tokens_per_block"] == [50, 50, 50] and base["not_priced"] == ["rtn"]
    assert "ms per image" in text and "not priced: rtn" in text
    (tmp_path / "t.yaml").write_text("name: t\nseed: 0\nsteps:\n  - {method: tome, r: 2, image_size: 28}\n")
    code, _, err = run_cli(["predict", "--model", str(vit_dir), "--recipe", str(tmp_path / "t.yaml"), "--image-size", "28",
                            "--batch", "2", "--json", str(out)], capsys)
    assert code == 0, err
    merged = json.loads(out.read_text())
    assert merged["tokens_per_block"] == [50, 48, 46] and merged["ms_per_image"] < base["ms_per_image"]
    code, _, err = run_cli(["predict", "--model", str(vit_dir), "--image-size", "30"], capsys)
    assert_one_line_error(code, err, "not a multiple of the patch size 4")


def test_gptq_calibrated_on_images_beats_rtn_on_a_vit_and_the_calibrated_pruners_run():
    """The LLM's calibrated methods on a ViT's linears: the layer stack is the encoder's blocks, the
    calibration set is images; GPTQ's output error is below RTN's on the same grid."""
    torch.manual_seed(0)
    calib, x = torch.randn(16, 3, 28, 28), torch.randn(8, 3, 28, 28)
    ref = tiny_dinov2()
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
    err = {}
    for method in ("rtn", "gptq"):
        m = tiny_dinov2()
        leanfm.apply_(m, {"method": method, "bits": 3, "group_size": 16, "symmetric": False}, calib=calib)
        with torch.no_grad():
            err[method] = float((m(pixel_values=x).last_hidden_state - want).pow(2).mean())
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert m.leanfm_info["steps"][-1]["calibration_images"] == 16
    for method in ("wanda", "sparsegpt"):
        m = tiny_dinov2()
        leanfm.apply_(m, {"method": method, "sparsity": 0.5}, calib=calib)
        w = m.encoder.layer[0].mlp.fc1.weight
        assert 0.45 < float((w == 0).float().mean()) < 0.55
    with pytest.raises(LeanfmError, match="gptq needs calibration data"):
        leanfm.apply_(tiny_dinov2(), {"method": "gptq", "bits": 4})


def test_bench_calibrates_gptq_on_train_images_and_records_it(vit_dir, fashion_dir, tmp_path, capsys):
    gptq = tmp_path / "gptq4.yaml"
    gptq.write_text("name: gptq4\nseed: 0\nsteps:\n  - {method: gptq, bits: 4, group_size: 16}\n")
    code, _, err = run_cli(_bench_args(vit_dir, fashion_dir, tmp_path / "run", "--recipe", "baseline", "--recipe", str(gptq)),
                           capsys)
    assert code == 0, err
    base, q = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert base["calibration"] is None
    assert q["calibration"] == {"dataset": "fashion-mnist train", "images": 80, "seed": 1000, "image_size": 28}
    assert q["metrics"]["weight_bytes"] < base["metrics"]["weight_bytes"] and q["metrics"]["feature_cosine"] > 0.9
