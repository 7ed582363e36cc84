"""CLI: the happy path on a tiny model, and one-line errors (exit 2, no traceback) for bad input."""
import json

import pytest

from leanfm import cli
from leanfm.models import registry

FAST = ["--seqlen", "64", "--prompt", "8", "--gen", "4", "--repeats", "2", "--threads", "1"]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_bench_tiny_end_to_end(tiny_model_dir, tiny_text, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", "rtn-w4",
                                 "--recipe", "baseline", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == "1.1"
    assert [r["recipe"]["name"] for r in res["runs"]] == ["baseline", "rtn-w4"]
    base, w4 = res["runs"]
    assert base["flags"]["simulated"] is False and w4["flags"]["simulated"] is False
    assert "cpp-int4" in w4["flags"]["kernel"] or "tinygemm-int4" in w4["flags"]["kernel"]  # auto: C++ kernel if it compiles
    assert w4["metrics"]["perplexity"] != base["metrics"]["perplexity"]
    assert w4["metrics"]["ppl_increase"] == pytest.approx(w4["metrics"]["perplexity"] / base["metrics"]["perplexity"] - 1)
    assert 0 <= w4["metrics"]["top1_agreement"] <= 1 and w4["metrics"]["kl_to_baseline"] > 0
    assert w4["metrics"]["weight_bytes"] < base["metrics"]["weight_bytes"]  # packed int4 linears
    for run in (base, w4):  # the roofline prediction sits next to every measured run
        m, pred = run["metrics"], run["details"]["prediction"]
        assert m["predicted_decode_tokens_per_s"] == pred["decode_tokens_per_s"] > 0 and m["predicted_prefill_ms"] > 0
        assert m["decode_prediction_error_pct"] == pytest.approx((pred["decode_tokens_per_s"] / m["decode_tokens_per_s"] - 1) * 100)
    assert w4["details"]["prediction"]["weight_bytes"] < base["details"]["prediction"]["weight_bytes"]
    assert {"threads", "load_average_before", "load_average_after", "versions", "cpu_model"} <= set(res["environment"])
    assert (out / "report.html").exists() and (out / "recipes" / "rtn-w4.yaml").exists()
    assert "report.html" in stdout and "rtn-w4" in stdout
    code, stdout, _ = run_cli(["report", str(out)], capsys)
    assert code == 0 and "baseline" in stdout


def test_compress_then_eval(tiny_model_dir, tiny_text, tmp_path, capsys, monkeypatch):
    from leanfm import allocator

    ck = tmp_path / "ck"
    code, stdout, err = run_cli(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-w8", "--out", str(ck)], capsys)
    assert code == 0, err
    assert (ck / "recipe.yaml").exists() and (ck / "config.json").exists() and (ck / "leanfm-quant.json").exists()
    assert "simulated" not in stdout
    pinned = []
    monkeypatch.setattr(allocator, "fix_mmap_threshold", lambda *a: pinned.append(a))
    code, _, err = run_cli(["eval", "--model", str(ck), "--dataset", str(tiny_text), "--out", str(tmp_path / "ev"), "--metrics", "quality", *FAST], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "ev" / "results.json").read_text())["runs"][0]
    assert run["flags"]["simulated"] is False and "int8pack" in run["flags"]["kernel"]
    assert pinned == [()]  # nothing timed: the heap gives freed transients back (issue 16's 7B eval)
    code, _, err = run_cli(["eval", "--model", str(ck), "--dataset", str(tiny_text), "--out", str(tmp_path / "ev2"), "--metrics", "speed", *FAST], capsys)
    assert code == 0, err
    assert pinned == [()]  # a timed run keeps glibc's default, which its figures were measured under


def test_compress_fake_quant_recipe_says_simulated(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "fake.yaml"
    recipe.write_text("name: fake-w4\nseed: 0\nsteps:\n  - {method: rtn, bits: 4, group_size: 64, backend: fake}\n")
    code, stdout, err = run_cli(["compress", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "ck")], capsys)
    assert code == 0, err
    assert "simulated" in stdout and not (tmp_path / "ck" / "leanfm-quant.json").exists()
    code, _, err = run_cli(["compress", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--format", "compressed-tensors",
                            "--out", str(tmp_path / "ct")], capsys)
    assert code == 2 and "no packed quantized layers" in err


@pytest.mark.parametrize("cmd", [[], ["models"], ["bench"], ["eval"], ["compress"], ["report"]])
def test_help_everywhere(cmd, capsys):
    code, out, _ = run_cli(cmd + ["--help"], capsys)
    assert code == 0 and "usage:" in out


def test_models_lists_aliases_and_install_commands(capsys, monkeypatch):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for alias in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"):
        assert alias in out


def test_unknown_alias(capsys):
    code, _, err = run_cli(["bench", "--model", "no-such-model"], capsys)
    assert_one_line_error(code, err, "unknown model 'no-such-model'", "smollm2-135m")


def test_alias_with_missing_package(capsys, monkeypatch):
    spec = registry.ModelSpec(alias="ghost-1m", title="x", params="1M", license="none", install="pip install ghost-model==1.0",
                              packages=("leanfm_ghost_model_pkg",), gguf_name="ghost.gguf")
    monkeypatch.setitem(registry.ALIASES, "ghost-1m", spec)
    code, _, err = run_cli(["bench", "--model", "ghost-1m"], capsys)
    assert_one_line_error(code, err, "not installed", "pip install ghost-model==1.0")


def test_missing_dataset_file(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", "wikitext2", "--data-dir", str(tmp_path / "nowhere"), *FAST], capsys)
    assert_one_line_error(code, err, "wikitext2", "--data-dir")
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "missing.txt"), *FAST], capsys)
    assert_one_line_error(code, err, "missing.txt", "does not exist")


@pytest.mark.parametrize("text,needles", [
    ("name: bad\nsteps:\n  - {method: rtn, bits: 4\n", ["malformed YAML", "line"]),
    ("name: bad\nseed: 0\nsteps:\n  - {method: quantum}\n", ["line 4", "unknown method 'quantum'"]),
    ("name: bad\nsteps:\n  - {method: rtn, bitz: 4}\n", ["line 3", "unknown parameter 'bitz'", "valid parameters"]),
])
def test_bad_recipe_files(tiny_model_dir, tmp_path, capsys, text, needles):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--recipe", str(p), *FAST], capsys)
    assert_one_line_error(code, err, str(p), *needles)


def test_group_size_not_dividing_576(tiny_model_dir, tiny_text, tmp_path, capsys):
    p = tmp_path / "g128.yaml"
    p.write_text("name: g128\nsteps:\n  - {method: rtn, bits: 4, group_size: 128}\n")
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", str(p),
                            "--out", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, "group_size 128 does not divide in_features 576 of layer model.layers.0.self_attn.q_proj", "64 or 192")


def test_max_eval_tokens_smaller_than_window(tiny_model_dir, tiny_text, tmp_path, capsys):
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--max-eval-tokens", "10",
                            "--out", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, "--max-eval-tokens 10 is smaller than one evaluation window")


@pytest.mark.parametrize("args,needle", [
    (["bench", "--metrics", "quality,vibes"], "unknown metric group 'vibes'"),
    (["bench", "--seqlen", "many"], "invalid int value"),
    (["bench", "--hardware-profile", "/no/such/profile.yaml"], "hardware profile"),
    (["report", "/no/such/dir"], "no results.json"),
    (["bench", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
])
def test_other_bad_input(args, needle, capsys):
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, needle)


def test_seqlen_beyond_model_context(tiny_model_dir, tiny_text, tmp_path, capsys):
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--seqlen", "4096",
                            "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "--seqlen 4096 exceeds the model's context of 512 tokens")


def test_quantizing_a_quantized_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    code, _, err = run_cli(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-w4", "--out", str(ck)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["compress", "--model", str(ck), "--recipe", "rtn-w8", "--out", str(tmp_path / "again")], capsys)
    assert code == 2 and "already quantized" in err and "full-precision checkpoint" in err and len(err.strip().splitlines()) == 1


def test_compress_to_compressed_tensors_reloads_in_transformers(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    import torch
    from transformers import AutoModelForCausalLM

    import leanfm

    ct = tmp_path / "ct"
    code, stdout, err = run_cli(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--format", "compressed-tensors",
                                 "--out", str(ct)], capsys)
    assert code == 0, err
    assert "compressed-tensors" in stdout and (ct / "recipe.yaml").exists()
    ours, _ = leanfm.load(str(tiny_model_dir))
    leanfm.apply_(ours, "rtn-w4g64")
    theirs = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 40))  # > 16 rows: leanfm runs the exact fp32 dequant path
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_bench_reuses_a_matching_baseline(tiny_model_dir, tiny_text, tmp_path):
    from leanfm.bench import bench
    from leanfm.errors import LeanfmError
    from leanfm.measure.protocol import Protocol

    proto = Protocol(dataset=str(tiny_text), seqlen=64, groups=("quality",), threads=1)
    first = bench(str(tiny_model_dir), ["baseline"], proto, tmp_path / "a")
    second = bench(str(tiny_model_dir), ["rtn-w4"], proto, tmp_path / "b", reuse_baseline=tmp_path / "a")
    base, w4 = second["runs"]
    assert base["reused_from"] == str(tmp_path / "a") and base["metrics"] == first["runs"][0]["metrics"]
    assert w4["metrics"]["ppl_increase"] == pytest.approx(w4["metrics"]["perplexity"] / base["metrics"]["perplexity"] - 1)
    assert w4["metrics"]["top1_agreement"] < 1
    with pytest.raises(LeanfmError, match="another model or protocol"):
        bench(str(tiny_model_dir), ["rtn-w4"], Protocol(dataset=str(tiny_text), seqlen=32, groups=("quality",), threads=1),
              tmp_path / "c", reuse_baseline=tmp_path / "a")
