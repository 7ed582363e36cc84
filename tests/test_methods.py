"""The method registry and the shared method matrix.

Every registered method has at least one row in ``MATRIX`` (a test enforces it): each row is
applied to a tiny random Llama through the one verb ``leanfm.apply_``, then the same checks run
for all of them: the step reports ``simulated``/``kernel``, the model still gives finite logits
of the right shape, a short decode runs through whatever the step attached, and the predictor
prices the step from the method's own declaration. Method-specific numerics live in each
family's test file.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import numpy as np
import torch

import leanfm
from leanfm import cli
from leanfm.config import BaseConfig, NotPriced, config_class, config_from_dict, methods
from leanfm.errors import LeanfmError
from leanfm.measure.speed import decode_benchmark
from leanfm.methods.effects import Effects
from leanfm.predict.recipe_effects import recipe_effects
from tests.conftest import tiny_llama

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"

MATRIX: list[dict] = [  # one step per row; hidden 64, GQA 4/2, 2 layers: small shapes every method accepts
    {"method": "rtn", "bits": 4, "group_size": 32, "backend": "reference"},
    {"method": "rtn", "bits": 8},
    {"method": "gptq", "bits": 4, "group_size": 32, "backend": "reference"},
    {"method": "awq", "bits": 4, "group_size": 32, "n_grid": 4, "backend": "reference"},
    {"method": "hqq", "bits": 4, "group_size": 32, "iters": 3, "backend": "reference"},
    {"method": "mixed_precision", "avg_bits": 5.5, "formats": ["w4", "w4g32", "w8"], "backend": "reference"},
    {"method": "smoothquant"},
    {"method": "embed_quant", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "magnitude", "sparsity": 0.5},
    {"method": "wanda", "pattern": "2:4"},
    {"method": "sparsegpt", "sparsity": 0.5, "backend": "csr"},
    {"method": "layerdrop", "count": 1},
    {"method": "width", "mlp_fraction": 0.5},
    {"method": "svd", "param_ratio": 0.5},
    {"method": "asvd", "param_ratio": 0.5},
    {"method": "streaming_llm", "budget": 8, "sinks": 2},
    {"method": "h2o", "budget": 8},
    {"method": "tova", "budget": 8},
    {"method": "snapkv", "budget": 8, "window": 2, "kernel": 3},
    {"method": "kv_quant", "bits": 4, "group_size": 16},
    {"method": "speculative", "draft": "prompt_lookup", "k": 2},
    {"method": "speculative", "draft": "self", "skip_layers": [1], "k": 2},
    {"method": "early_exit", "threshold": 0.5, "min_layer": 0},
    # fine-tuning: a few steps on a small text (test_method_matrix loads the model with its tokenizer)
    {"method": "full", "steps": 2, "batch": 1, "seqlen": 16},
    {"method": "lora", "steps": 2, "batch": 1, "seqlen": 16, "rank": 2},
    {"method": "dora", "steps": 2, "batch": 1, "seqlen": 16, "rank": 2, "targets": ["q_proj", "v_proj"]},
    {"method": "qlora", "steps": 2, "batch": 1, "seqlen": 16, "rank": 2, "checkpointing": True},
    {"method": "kd", "steps": 2, "batch": 1, "seqlen": 16, "adapter": "lora", "rank": 2, "hidden_weight": 0.1},
    {"method": "mezo", "steps": 2, "batch": 1, "seqlen": 16},
    # vision transformers only (a tiny random DINOv2, 28x28 images of 4x4 patches)
    {"method": "tome", "r": 2, "image_size": 28},
    {"method": "token-prune", "keep_rate": 0.5, "layers": [0, 1], "image_size": 28},
    # diffusion denoisers only (a tiny random diffusers UNet exported to ONNX)
    {"method": "sampling-steps", "steps": 2},
    {"method": "deepcache", "interval": 2},
    {"method": "onnx-int8", "activations": False},
    {"method": "onnx-int8", "activations": True, "calib_seeds": 1},
    # diffusers pipelines only (a tiny random text-to-image pipeline)
    {"method": "dpm-solver", "order": 2},
    {"method": "tome-unet", "ratio": 0.5},
]


def _tiny_denoiser():
    """A DenoiserModel around a tiny random diffusers UNet2DModel exported to ONNX (EDM-preconditioned)."""
    import io

    import onnx
    from diffusers import UNet2DModel

    from leanfm.models.denoiser import DenoiserConfig, DenoiserModel
    from tests.test_diffusion import _EDMDenoiser, export_denoiser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    buf = io.BytesIO()
    export_denoiser(_EDMDenoiser(unet).eval(), buf)
    model = DenoiserModel(onnx.load_from_string(buf.getvalue()), DenoiserConfig(size=16, cond_input="difficulty"))
    model.leanfm_info = {"family": "diffusion", "steps": []}
    return model


def _id(row: dict) -> str:
    return "-".join(str(v) for v in row.values())


def test_every_method_has_a_matrix_row_a_docs_entry_and_a_cost_effect():
    assert {r["method"] for r in MATRIX} == set(methods())
    docs = DOCS.read_text()
    for m in methods():
        d = config_class(m).describe()
        assert f"\n## `{m}`\n" in docs, f"docs/methods.md has no section for {m} (regenerate: leanfm methods --markdown)"
        assert d["produces"], f"{m} declares no 'produces'"
        assert d["description"], f"{m} has no docstring"
        eff = Effects(recipe="x")
        config_from_dict(dict(next(r for r in MATRIX if r["method"] == m))).effect(eff)
        priced = bool(eff.rules or eff.drop or eff.width or eff.kv or eff.speculative or eff.neutral)
        assert priced or eff.unmodelled, f"{m}'s effect records nothing and gives no reason"


def test_methods_markdown_is_generated_from_the_declarations():
    """docs/methods.md's method sections are exactly what ``leanfm methods --markdown`` prints."""
    from leanfm.cli import methods_markdown

    assert methods_markdown() in DOCS.read_text()


def test_listing_methods_imports_no_torch():
    code = "import sys; from leanfm.config import methods, config_class; " \
           "[config_class(m).describe() for m in methods()]; " \
           "from leanfm.predict.recipe_effects import recipe_effects; recipe_effects('int4-fast+streamingllm512'); " \
           "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]


def _loaded_with_tokenizer(model, tmp_path: Path):
    """``model`` saved with a tokenizer and loaded by leanfm (what a tuning step needs: its
    tokenizer for the training text, its source as the default teacher)."""
    from tests.conftest import SAMPLE_TEXT, tiny_tokenizer

    d = tmp_path / "model"
    model.save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    return leanfm.load(str(d))[0]


@pytest.mark.parametrize("row", MATRIX, ids=_id)
def test_method_matrix(row, tmp_path):
    cfg = config_from_dict(dict(row))
    torch.manual_seed(0)
    if cfg.families == ("diffusion-pipeline",):  # a pipeline method: apply, then sample from the changed pipeline
        pytest.importorskip("diffusers")
        from leanfm.models.pipeline import PipelineModel
        from tests.test_diffusers_pipeline import tiny_sd_pipeline

        model = PipelineModel(tiny_sd_pipeline(tmp_path))
        model.leanfm_info = {"family": "diffusion-pipeline", "steps": []}
        leanfm.apply_(model, cfg)
        step = model.leanfm_info["steps"][-1]
        assert isinstance(step["simulated"], bool) and step["kernel"]
        x = model.generate([0, 1], 2)
        assert x.shape == (2, 3, 16, 16) and np.isfinite(x).all()
        assert recipe_effects([cfg]).steps == [row["method"]]
        return
    if "diffusion" in cfg.families:  # a denoiser method: apply, then sample from the changed model
        pytest.importorskip("diffusers")
        from leanfm.methods.diffusion.run import denoiser, sample

        model = leanfm.apply_(_tiny_denoiser(), cfg)
        step = model.leanfm_info["steps"][-1]
        assert isinstance(step["simulated"], bool) and step["kernel"]
        x = sample(model, [0, 1], 2, denoiser(model, 1))
        assert x.shape == (2, 1, 16, 16) and np.isfinite(x).all()
        assert recipe_effects([cfg]).steps == [row["method"]]
        return
    if "causal-lm" not in cfg.families:  # a vision method: the same checks on a tiny ViT's features
        from tests.test_vision import tiny_dinov2

        model = leanfm.apply_(tiny_dinov2(image=28, patch=4), cfg)
        step = model.leanfm_info["steps"][-1]
        assert isinstance(step["simulated"], bool) and step["kernel"]
        with torch.no_grad():
            feats = model(pixel_values=torch.randn(2, 3, 28, 28)).last_hidden_state
        assert feats.shape[0] == 2 and torch.isfinite(feats).all()
        assert recipe_effects([cfg]).steps == [row["method"]]
        return
    model = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128)
    if cfg.produces == "tuned-weights":
        model = _loaded_with_tokenizer(model, tmp_path)
        cfg = config_from_dict({**row, "data": str(tmp_path / "train.txt"),
                                **({"teacher": str(tmp_path / "model")} if row["method"] == "kd" else {})})
    calib = torch.randint(3, 300, (4, 96)) if cfg.needs_calibration or row["method"] in ("wanda", "sparsegpt", "asvd", "layerdrop", "width") else None
    leanfm.apply_(model, cfg, calib=calib)
    step = model.leanfm_info["steps"][-1]
    assert isinstance(step["simulated"], bool) and step["kernel"]
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 12, 300) and torch.isfinite(logits).all()
    res = decode_benchmark(model, ids, gen=3, repeats=1, warmup=0)
    assert res["metrics"]["decode_tokens_per_s"] > 0
    for m in cfg.adds_metrics:  # what the declaration promises, the measurement reports
        assert m in res["metrics"], m
    eff = recipe_effects([cfg])
    assert eff.steps == [row["method"]]


def _noop(model, cfg, calib=None):
    return {"simulated": False, "kernel": "none"}


@pytest.fixture
def unpriced():
    """A method declared without a cost effect, registered for one test only."""
    from leanfm.config import _REGISTRY

    @dataclass
    class _UnpricedConfig(BaseConfig):
        """A method with no cost effect (test only)."""

        method = "unpriced_test_method"
        handler = "tests.test_methods:_noop"

    yield _UnpricedConfig
    _REGISTRY.pop("unpriced_test_method", None)


def test_a_step_the_predictor_cannot_price_is_refused_in_one_line(unpriced, tmp_path, capsys):
    with pytest.raises(NotPriced, match="cannot price method 'unpriced_test_method'"):
        recipe_effects([unpriced()])
    r = tmp_path / "r.yaml"
    r.write_text("name: r\nsteps:\n  - {method: unpriced_test_method}\n")
    assert cli.main(["predict", "--model", "smollm2-135m", "--recipe", str(r)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot price method 'unpriced_test_method'" in err[0]


def test_methods_cli(capsys):
    assert cli.main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["method"] for d in listed} == set(methods())
    gptq = next(d for d in listed if d["method"] == "gptq")
    assert gptq["needs_calibration"] is True and gptq["produces"] == "int-weights"
    assert {"name": "damp", "type": "float", "default": 0.01} in gptq["parameters"]
    assert cli.main(["methods", "wanda"]) == 0
    assert "wanda" in capsys.readouterr().out


def test_unknown_method_in_methods_cli_is_one_line(capsys):
    assert cli.main(["methods", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nope'" in err[0] and "known methods:" in err[0]


def test_apply_rejects_a_non_config(tmp_path):
    with pytest.raises(LeanfmError):
        leanfm.apply_(tiny_llama(), {"method": "nope"})
