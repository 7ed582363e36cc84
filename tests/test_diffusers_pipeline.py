"""Diffusers pipelines as a leanfm family (issue 19): tiny random pipelines saved with
``save_pretrained`` (a text-to-image ``StableDiffusionPipeline`` around a ``UNet2DConditionModel``,
and an unconditional ``DDPMPipeline`` around a ``UNet2DModel``), loaded by ``leanfm.load`` and
sampled by the pipelines' own ``__call__``; DPM-Solver, DeepCache in torch, ToMe in the UNet's
attention and the LLM weight quantizers on the UNet's linears; ``leanfm bench`` on them."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

from leanfm.errors import LeanfmError

diffusers = pytest.importorskip("diffusers")


def _clip_tokenizer(folder):
    """A character-level CLIP tokenizer (no merges) written to ``folder``: no hub download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def tiny_cond_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()  # 2+ channels per group: the time embedding survives GroupNorm


def tiny_sd_pipeline(tmp):
    """A tiny random text-to-image pipeline: CLIP text encoder, cross-attention UNet, VAE, DDIM
    (``tmp``: a folder for the tokenizer's files)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer(tmp / "tok-src")
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_cond_unet(), scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(d).save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    d = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(d)
    return d


def _unet_calls(model) -> list:
    calls = []
    model.unet.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls


@pytest.mark.parametrize("which", ["sd", "ddpm"])
def test_a_pipeline_folder_loads_as_its_family_and_samples_each_seed_alone(which, sd_dir, ddpm_dir):
    import leanfm
    from leanfm.models.family import family_of_name

    d = sd_dir if which == "sd" else ddpm_dir
    model, tok = leanfm.load(str(d))
    assert tok is None and model.leanfm_info["family"] == "diffusion-pipeline" == family_of_name(str(d))
    calls = _unet_calls(model)
    x = model.generate([0, 1, 2], 3)
    assert x.shape == (3, 3, 16, 16) and x.dtype == np.float32
    assert len(calls) == 3  # one UNet call per step (a guided pipeline batches both halves in one call)
    one = model.generate([2], 3)  # sample j depends on its own seed (and prompt) only
    np.testing.assert_allclose(one[0], x[2], atol=1e-5)
    assert not np.allclose(x[0], x[1])
    assert 0 < model.weight_bytes() <= model.file_bytes()


@pytest.mark.parametrize("which", ["cond", "plain"])
def test_torch_deepcache_shallow_pass_reproduces_the_full_unet_from_its_cached_feature(which):
    """On the same input a cached step computes what the full UNet does: the stubs skip exactly the
    modules whose result the cache replaces, diffusers' own forward does the rest."""
    from leanfm.methods.diffusion.deepcache_torch import TorchDeepCache

    unet = tiny_cond_unet() if which == "cond" else tiny_unet()
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    extra = {"encoder_hidden_states": torch.randn(2, 5, 32)} if which == "cond" else {}
    with torch.no_grad():
        ref = unet(x, 10, **extra).sample
        cache = TorchDeepCache(unet, interval=3)
        full = unet(x, 10, **extra).sample
        shallow = unet(x, 10, **extra).sample
        other = unet(x, 500, **extra).sample  # another timestep: the deep feature is stale, the shallow path fresh
        unet(x, 10, **extra)  # the 4th call is full again
    torch.testing.assert_close(full, ref, rtol=0, atol=0)
    torch.testing.assert_close(shallow, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, ref, atol=1e-4)
    assert (cache.full_calls, cache.shallow_calls) == (2, 2)
    with pytest.raises(LeanfmError, match="already applied"):
        TorchDeepCache(unet, 2)


def test_grid_merge_keeps_one_destination_per_cell_and_unmerges_back_to_every_position():
    from leanfm.methods.diffusion.tome_unet import grid_merge

    torch.manual_seed(0)
    h = w = 8
    cell = torch.randn(1, 4, 4, 6)  # every 2x2 cell holds one repeated token: merging inside cells loses nothing
    x = cell.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, h * w, 6)
    for gen in (None, torch.Generator().manual_seed(3)):
        merge, unmerge = grid_merge(x, h, w, 2, r=48, generator=gen)
        y = merge(x)
        assert y.shape == (1, 16, 6)  # 64 tokens - 48 merged: one per cell
        torch.testing.assert_close(unmerge(y), x)
    merge, unmerge = grid_merge(x, h, w, 2, r=0)
    assert merge(x) is x and unmerge(x) is x
    y = torch.randn(2, 64, 6)  # the merge averages: its mean over tokens weighted by size is kept
    merge, unmerge = grid_merge(y, h, w, 2, r=10)
    assert merge(y).shape == (2, 54, 6) and unmerge(merge(y)).shape == (2, 64, 6)
    with pytest.raises(LeanfmError, match="do not form a 8x7 grid"):
        grid_merge(y, 8, 7, 2, r=4)


def test_tome_unet_runs_self_attention_on_fewer_tokens_and_refuses_a_unet_without_transformer_blocks(sd_dir, ddpm_dir):
    import leanfm

    base, _ = leanfm.load(str(sd_dir))
    model, _ = leanfm.load(str(sd_dir))
    leanfm.apply_(model, {"method": "tome-unet", "ratio": 0.5})
    seen = []
    for blk in (m for m in model.unet.modules() if type(m).__name__ == "BasicTransformerBlock"):
        blk.attn1.register_forward_pre_hook(lambda m, a, k: seen.append((k.get("hidden_states", a[0] if a else None)).shape[1]),
                                            with_kwargs=True, prepend=False)
    x, ref = model.generate([0, 1], 2), base.generate([0, 1], 2)
    assert set(seen) == {32, 16}  # 8x8 latent: 64 tokens, half merged; the mid block's 4x4 (downsampled 2x) is left
    assert model.unet.leanfm_tome.merged_calls == seen.count(32) == 6  # 3 high-resolution blocks x 2 steps
    np.testing.assert_array_equal(x, model.generate([0, 1], 2))  # the random destinations repeat per batch
    assert 0 < np.abs(x - ref).max() < 0.5
    plain, _ = leanfm.load(str(ddpm_dir))
    with pytest.raises(LeanfmError, match="BasicTransformerBlock"):
        leanfm.apply_(plain, {"method": "tome-unet"})


def test_dpm_solver_replaces_the_scheduler_and_sampling_steps_sets_the_unet_calls(sd_dir):
    import leanfm

    model, _ = leanfm.load(str(sd_dir))
    leanfm.apply_(model, "dpm-solver10")
    assert type(model.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert model.scheduler.config.solver_order == 2 and model.scheduler.config.algorithm_type == "dpmsolver++"
    calls = _unet_calls(model)
    model.generate([0], 4)  # the recipe's 10 steps, not the call's 4
    assert len(calls) == 10 and model.steps == 10


def test_rtn_quantizes_the_unet_linears_and_leaves_the_text_encoder(sd_dir):
    import leanfm
    from leanfm.kernels.qlinear import QuantLinear

    base, _ = leanfm.load(str(sd_dir))
    model, _ = leanfm.load(str(sd_dir))
    leanfm.apply_(model, "rtn-w8")
    assert any(isinstance(m, QuantLinear) for m in model.unet.modules())
    assert not any(isinstance(m, QuantLinear) for m in model.pipe.text_encoder.modules())
    assert model.weight_bytes() < base.weight_bytes()
    np.testing.assert_allclose(model.generate([0], 3), base.generate([0], 3), atol=0.05)


def test_deepcache_on_a_pipeline_runs_the_full_unet_every_interval_steps(sd_dir):
    import leanfm

    model, _ = leanfm.load(str(sd_dir))
    leanfm.apply_(model, "deepcache2")
    cache = model.unet.leanfm_deepcache
    model.generate([0, 1], 5)
    assert (cache.full_calls, cache.shallow_calls) == (3, 2)
    model.generate([0, 1], 5)  # every batch starts with a full step
    assert (cache.full_calls, cache.shallow_calls) == (6, 4)


def _bench(d, out, *extra):
    return ["bench", "--model", str(d), "--samples", "4", "--steps", "4", "--threads", "1", "--out", str(out), *extra]


def test_bench_measures_a_pipeline_per_sample_against_the_baseline_images(sd_dir, tmp_path, capsys):
    import leanfm

    from .test_cli import run_cli

    code, out, err = run_cli(_bench(sd_dir, tmp_path / "run", "--recipe", "baseline", "--recipe", "dpm-solver10",
                                    "--recipe", "deepcache2", "--recipe", "tome-unet50", "--recipe", "rtn-w8"), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    leanfm.results.validate(res)
    base, dpm, cached, tome, w8 = res["runs"]
    assert res["environment"]["runtime"] == "torch" and base["family"] == "diffusion-pipeline"
    assert [r["details"]["sampling_steps"] for r in res["runs"]] == [4, 10, 4, 4, 4]
    assert base["metrics"]["ssim"] == pytest.approx(1.0) and "psnr_db" not in base["metrics"]
    for run in (dpm, cached, tome, w8):
        m = run["metrics"]
        assert 0 < m["psnr_db"] < 200 and m["ssim"] <= 1.0 and m["samples_per_s"] > 0
        assert m["ms_per_step"] == pytest.approx(m["ms_per_sample"] / run["details"]["sampling_steps"])
        assert not run["flags"]["simulated"] and run["flags"]["kernel"]
    assert w8["metrics"]["weight_bytes"] < base["metrics"]["weight_bytes"]
    # the roofline from a trace of the pipeline's operators prices every run as its recipe left it
    for run in res["runs"]:
        m = run["metrics"]
        assert m["predicted_ms_per_step"] > 0, run["details"]["prediction"]
        assert m["ms_per_step_prediction_error_pct"] == pytest.approx((m["predicted_ms_per_step"] / m["ms_per_step"] - 1) * 100)
    p = {r["recipe"]["name"]: r["details"]["prediction"] for r in res["runs"]}
    assert p["deepcache2"]["ms_per_sample"] < p["baseline"]["ms_per_sample"]
    assert p["deepcache2"]["shallow_ms_per_pass"] < p["deepcache2"]["unet_ms_per_pass"]
    assert p["dpm-solver10"]["ms_per_sample"] > 2 * p["baseline"]["ms_per_sample"]  # 10 steps against 4
    assert p["baseline"]["guidance_batch"] == 2  # classifier-free guidance: two latents per sample
    assert "PSNR dB" in out and "DDIMScheduler" in out


@pytest.mark.parametrize("extra,needles", [
    (["--recipe", "onnx-int8w"], ["method 'onnx-int8' does not apply to a diffusion-pipeline model",
                                  "methods for diffusion-pipeline models:", "dpm-solver", "tome-unet"]),
    (["--recipe", "gptq-w4"], ["method 'gptq' does not apply to a diffusion-pipeline model"]),
    (["--recipe", "@ratio1"], ["tome-unet ratio=1.0 must be a number with 0 <= ratio < 1"]),
    (["--recipe", "@order4"], ["dpm-solver order=4 must be 1, 2 or 3"]),
    (["--recipe", "@cache1step"], ["deepcache reuses features across steps, but it samples with 1 step"]),
    (["--runtime", "onnxruntime"], ["a diffusers pipeline is measured in torch on the CPU"]),
], ids=["onnx-method", "llm-calibrated-method", "tome-ratio", "dpm-order", "deepcache-one-step", "runtime"])
def test_bench_refuses_bad_pipeline_input_in_one_line(sd_dir, tmp_path, capsys, extra, needles):
    from .test_cli import assert_one_line_error, run_cli

    files = {"@ratio1": "name: r1\nseed: 0\nsteps:\n  - {method: tome-unet, ratio: 1.0}\n",
             "@order4": "name: o4\nseed: 0\nsteps:\n  - {method: dpm-solver, order: 4}\n",
             "@cache1step": "name: c1\nseed: 0\nsteps:\n  - {method: sampling-steps, steps: 1}\n  - {method: deepcache}\n"}
    for k, text in files.items():
        (tmp_path / f"{k[1:]}.yaml").write_text(text)
    extra = [str(tmp_path / f"{e[1:]}.yaml") if e in files else e for e in extra]
    code, _, err = run_cli(_bench(sd_dir, tmp_path / "run") + extra, capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run" / "results.json").exists()


def test_predict_prices_a_pipeline_from_its_traced_operators(sd_dir, ddpm_dir, tmp_path, capsys):
    from .test_cli import run_cli

    out = tmp_path / "p.json"
    code, text, err = run_cli(["predict", "--model", str(sd_dir), "--recipe", "deepcache2", "--steps", "4", "--batch", "2",
                               "--json", str(out)], capsys)
    assert code == 0, err
    p = json.loads(out.read_text())
    assert p["family"] == "diffusion-pipeline" and p["steps"] == 4 and p["guidance_batch"] == 2
    assert p["ms_per_sample"] == pytest.approx(4 * p["ms_per_step"]) and 0 < p["shallow_ms_per_pass"] < p["unet_ms_per_pass"]
    assert "diffusers pipeline" in text and "DeepCache shallow pass" in text
    code, text, err = run_cli(["predict", "--model", str(ddpm_dir), "--steps", "3"], capsys)
    assert code == 0, err
    assert "UNet on 1 latent(s) per sample" in text  # unconditional: no guidance batch


def test_the_trace_counts_a_linear_and_a_convolution_as_torch_counts_them():
    from leanfm.predict.torch_trace import trace_costs

    lin, conv = torch.nn.Linear(64, 32), torch.nn.Conv2d(4, 8, 3, padding=1)
    (lc,), (cc,) = trace_costs(lambda: lin(torch.zeros(8, 64))), trace_costs(lambda: conv(torch.zeros(2, 4, 16, 16)))
    assert sum(c["flops"] for c in lc) == 2 * 8 * 64 * 32
    assert sum(c["bytes"] for c in lc) >= 4 * (64 * 32 + 8 * 64 + 8 * 32)  # weight, input, output at least once
    assert sum(c["flops"] for c in cc if "convolution" in c["op"]) == 2 * 2 * 8 * 16 * 16 * 4 * 9
    assert all(not c["op"].endswith(("view", "t", "permute")) for c in lc + cc)  # views are free
    assert not [c["op"] for c in lc + cc if c["op"].startswith("prim.")]  # metadata queries (prim.device) are free
    # as GEMMs: the linear multiplies its 8 rows, the convolution one row per output position
    assert [c["rows"] for c in lc if c["rows"]] == [8]
    assert [c["rows"] for c in cc if "convolution" in c["op"]] == [2 * 16 * 16]
    assert lin.weight.device.type == "cpu" and torch.isfinite(lin.weight).all()  # the real weights are untouched


def test_matmuls_of_few_rows_are_priced_at_the_calibrated_gemm_rate_for_their_rows():
    from leanfm.predict.unet import price_ops

    hw = {"peak_tflops": {"fp32": 0.1}, "memory_bandwidth_gbps": 1e6, "overhead_us_per_op": 0.0}
    op = {"flops": 1e9, "bytes": 0.0}
    assert price_ops([{**op, "rows": 16}], hw)["ms"] == pytest.approx(10.0)  # no curve: the peak (1e9 / 1e11 s)
    hw["gemm_fp32_curve"] = [[2, 1e10], [128, 5e10], [2048, 2e11]]
    assert price_ops([{**op, "rows": 16}], hw)["ms"] == pytest.approx(1e3 * 1e9 / 3e10)  # halfway in log(rows)
    assert price_ops([{**op, "rows": 4096}], hw)["ms"] == pytest.approx(10.0)  # capped at the peak
    assert price_ops([{**op, "rows": None}], hw)["ms"] == pytest.approx(10.0)  # elementwise: the peak
    conv = {**op, "rows": 4096, "conv_weight_bytes": 3e8}
    assert price_ops([conv], hw)["ms"] == pytest.approx(10.0)  # no calibrated relayout rate: arithmetic only
    hw["conv_weight_gbps"] = 1.5  # an eager convolution first re-lays its weights out: 3e8 B / 1.5e9 B/s = 200 ms
    assert price_ops([conv], hw)["ms"] == pytest.approx(210.0)


def test_the_trace_gives_an_eager_convolution_its_weight_bytes():
    from leanfm.predict.torch_trace import trace_costs

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    (cc,) = trace_costs(lambda: conv(torch.zeros(2, 8, 4, 4)))
    assert [c["conv_weight_bytes"] for c in cc if "conv_weight_bytes" in c] == [4 * 16 * 8 * 9]


def test_compress_writes_a_pipeline_folder_that_loads_back_and_samples_as_the_recipe_did(sd_dir, tmp_path, capsys):
    import leanfm
    from leanfm.kernels.qlinear import QuantLinear

    from .test_cli import run_cli

    recipe = "dpm-solver10+deepcache2+rtn-w8"
    code, out, err = run_cli(["compress", "--model", str(sd_dir), "--recipe", recipe, "--out", str(tmp_path / "c"),
                              "--threads", "1"], capsys)
    assert code == 0, err
    assert "applied again at load: sampling-steps, deepcache" in out
    assert (tmp_path / "c" / "unet" / "leanfm-quant.json").is_file() and (tmp_path / "c" / "recipe.yaml").is_file()
    ref, _ = leanfm.load(str(sd_dir))
    leanfm.apply_(ref, recipe)
    back, _ = leanfm.load(str(tmp_path / "c"))
    assert type(back.scheduler).__name__ == "DPMSolverMultistepScheduler" and back.steps == 10
    assert hasattr(back.unet, "leanfm_deepcache") and any(isinstance(m, QuantLinear) for m in back.unet.modules())
    assert [s["method"] for s in back.leanfm_info["steps"]] == ["load-quantized", "sampling-steps", "deepcache"]
    assert all(s["from_checkpoint"] for s in back.leanfm_info["steps"][1:])  # recorded as applied again at load
    assert back.weight_bytes() == ref.weight_bytes()
    np.testing.assert_allclose(back.generate([0, 1], 4), ref.generate([0, 1], 4), atol=1e-5)


def test_a_compressed_pipeline_without_packed_layers_loads_in_plain_diffusers(sd_dir, tmp_path, capsys):
    import leanfm
    from diffusers import DiffusionPipeline

    from .test_cli import assert_one_line_error, run_cli

    code, out, err = run_cli(["compress", "--model", str(sd_dir), "--recipe", "tome-unet50", "--out", str(tmp_path / "c")],
                             capsys)
    assert code == 0, err
    plain = DiffusionPipeline.from_pretrained(str(tmp_path / "c"))  # diffusers alone: the weights as they were
    assert type(plain.unet).__name__ == "UNet2DConditionModel"
    back, _ = leanfm.load(str(tmp_path / "c"))
    assert back.unet.leanfm_tome.ratio == 0.5  # and leanfm applies the recipe's ToMe again
    code, _, err = run_cli(["compress", "--model", str(sd_dir), "--recipe", "onnx-int8w", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "method 'onnx-int8' does not apply to a diffusion-pipeline model")
    code, _, err = run_cli(["compress", "--model", str(sd_dir), "--recipe", "rtn-w8", "--format", "gguf",
                            "--out", str(tmp_path / "g")], capsys)
    assert_one_line_error(code, err, "a diffusers pipeline is written as a pipeline folder; --format gguf is for causal LMs")
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()
