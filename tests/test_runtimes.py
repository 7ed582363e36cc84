"""``--runtime``: the same schema measured inside llama.cpp (ONNX Runtime: tests/test_onnx_export.py),
``leanfm export``, and the refusals (runtime unknown, not installed, not runnable here)."""
import json

import pytest

from leanfm import cli
from leanfm.errors import LeanfmError
from leanfm.runtimes import check_runtime

FAST = ["--seqlen", "64", "--max-eval-tokens", "256", "--prompt", "16", "--gen", "4", "--repeats", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def q4_0_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny model compressed once with rtn-q4_0 (leanfm format), for the export tests."""
    ck = tmp_path_factory.mktemp("q4") / "ck"
    assert cli.main(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-q4_0", "--out", str(ck), "--threads", "1"]) == 0
    return ck


def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_in_llama_cpp_measures_the_exported_files(tiny_model_dir, tiny_text, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "b"
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", "rtn-q4_0",
                            "--runtime", "llama.cpp", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["runtime"] == "llama.cpp"
    base, q = res["runs"]
    for run, kind in ((base, "F32"), (q, "Q4_0")):
        assert run["status"] == "ok"
        assert run["runtime"]["runtime"] == "llama.cpp" and run["runtime"]["runtime_version"].startswith("llama-cpp-python")
        assert run["flags"]["kernel"].startswith(f"llama.cpp (gguf: {kind}") and run["flags"]["simulated"] is False
        assert run["metrics"]["weight_bytes"] == run["runtime"]["file_bytes"] == (out / "files" / (run["recipe"]["name"] + ".gguf")).stat().st_size
        assert run["metrics"]["decode_tokens_per_s"] > 0 and run["metrics"]["perplexity"] > 1
        assert run["details"]["quality_logits"].startswith("llama.cpp")
    # the baseline's fidelity is llama.cpp's f32 against leanfm's torch fp32 on the same weights
    assert base["metrics"]["top1_agreement"] >= 0.99
    assert q["metrics"]["weight_bytes"] < 0.4 * base["metrics"]["weight_bytes"]


def test_eval_in_llama_cpp_equals_torch_on_the_same_weights(tiny_model_dir, tiny_text, tmp_path, capsys):
    """Faithful runtime: llama.cpp's perplexity of the f32 export equals leanfm's torch perplexity
    of the same weights within 0.5%."""
    pytest.importorskip("llama_cpp")
    args = ["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--metrics", "quality", *FAST]
    assert run_cli(args + ["--out", str(tmp_path / "t")], capsys)[0] == 0
    assert run_cli(args + ["--out", str(tmp_path / "l"), "--runtime", "llama.cpp"], capsys)[0] == 0
    ppl = [json.loads((tmp_path / d / "results.json").read_text())["runs"][0]["metrics"]["perplexity"] for d in ("t", "l")]
    assert abs(ppl[1] / ppl[0] - 1) < 0.005, ppl


def test_export_writes_a_gguf_llama_cpp_loads_and_refuses_to_overwrite(q4_0_checkpoint, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    ck = q4_0_checkpoint
    out = tmp_path / "m.gguf"
    code, stdout, err = run_cli(["export", str(ck), "--format", "gguf", "--out", str(out)], capsys)
    assert code == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    code, _, err = run_cli(["export", str(ck), "--format", "gguf", "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["export", str(ck), "--format", "gguf", "--out", str(tmp_path / "m.bin")], capsys)
    assert code == 2 and "must end in .gguf" in err
    code, _, err = run_cli(["export", str(ck), "--format", "gguf", "--type", "f16", "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and "packed 4-bit weights" in err and "q4_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_runtime_refusals(monkeypatch):
    import importlib.util

    import torch

    with pytest.raises(LeanfmError, match="unknown runtime 'tensorrt'"):
        check_runtime("tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(LeanfmError, match="needs a CUDA GPU"):
            check_runtime("vllm")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llama_cpp", "onnxruntime") else real(name, *a))
    with pytest.raises(LeanfmError, match=r"llama.cpp is not installed; install it with: pip install 'leanfm\[llamacpp\]'"):
        check_runtime("llama.cpp")
    with pytest.raises(LeanfmError, match=r"pip install 'leanfm\[onnx\]'"):
        check_runtime("onnxruntime")


def test_bench_runtime_refusals_are_one_line(tiny_model_dir, tiny_text, tmp_path, capsys):
    import torch

    base = ["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", "baseline", *FAST]
    if importlib_has("llama_cpp"):
        code, _, err = run_cli(base + ["--runtime", "llama.cpp", "--batch", "2", "--out", str(tmp_path / "a")], capsys)
        assert code == 2 and "--batch 1" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = run_cli(base + ["--runtime", "vllm", "--out", str(tmp_path / "b")], capsys)
        assert code == 2 and "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "results.json").exists()


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_bench_in_bf16_records_the_dtype(tiny_model_dir, tiny_text, tmp_path, capsys):
    out = tmp_path / "bf"
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--dtype", "bf16",
                            "--recipe", "baseline", "--recipe", "wanda50", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert res["environment"]["torch_device"]["dtype"] == "bf16" and run["flags"]["kernel"] == "torch-dense-bf16"
    assert res["protocol"]["dtype"] == "bf16"
    # bf16 weights are half the fp32 bytes
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--metrics", "memory",
                            "--recipe", "baseline", "--out", str(tmp_path / "fp"), *FAST], capsys)
    fp = json.loads((tmp_path / "fp" / "results.json").read_text())["runs"][0]["metrics"]["weight_bytes"]
    assert run["metrics"]["weight_bytes"] == fp // 2


@pytest.mark.parametrize("args,needle", [
    (["--device", "cuda"], "--device cuda: torch sees no GPU"),
    (["--dtype", "fp16"], "--dtype fp16: this CPU has no fp16 arithmetic"),
    (["--recipe", "rtn-w4", "--dtype", "bf16"], "recipe rtn-w4 packs int weights"),
    (["--recipe", "baseline", "--runtime", "llama.cpp", "--dtype", "bf16"], "--device/--dtype choose where the torch runtime runs"),
    (["--recipe", "baseline", "--runtime", "onnxruntime", "--compile"], "--compile compiles leanfm's torch decode step"),
])
def test_device_and_dtype_refusals_are_one_line(tiny_model_dir, tiny_text, tmp_path, capsys, args, needle):
    import torch

    from leanfm.sysinfo import cpu_flags

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "fp16" in args and cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        pytest.skip("this CPU computes in fp16")
    if "llama.cpp" in args and not importlib_has("llama_cpp"):
        pytest.skip("llama.cpp not installed")
    if "onnxruntime" in args and not importlib_has("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--out", str(tmp_path / "x"),
                            *FAST, *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_bench_in_onnxruntime_measures_the_onnx_export(tiny_model_dir, tiny_text, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "o"
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", "rtn-q4_0",
                            "--runtime", "onnxruntime", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    base, q = json.loads((out / "results.json").read_text())["runs"]
    for run in (base, q):
        assert run["status"] == "ok" and run["runtime"]["runtime"] == "onnxruntime"
        assert run["flags"]["kernel"].startswith("onnxruntime (onnx") and run["metrics"]["decode_tokens_per_s"] > 0
        assert run["metrics"]["weight_bytes"] == (out / "files" / (run["recipe"]["name"] + ".onnx")).stat().st_size
    assert base["metrics"]["top1_agreement"] >= 0.99  # ONNX Runtime's fp32 graph against leanfm's torch forward
    assert q["metrics"]["weight_bytes"] < 0.5 * base["metrics"]["weight_bytes"]


@pytest.mark.parametrize("runtime,extra", [("llama.cpp", "llamacpp"), ("onnxruntime", "onnx")])
def test_a_runtime_not_installed_is_one_line_naming_the_install(tiny_model_dir, tiny_text, tmp_path, capsys, monkeypatch, runtime, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llama_cpp", "onnxruntime") else real(name, *a))
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--runtime", runtime,
                            "--out", str(tmp_path / "x"), *FAST], capsys)
    assert code == 2 and f"pip install 'leanfm[{extra}]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "results.json").exists()


def test_export_writes_an_onnx_decoder_with_matmulnbits(q4_0_checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ck = q4_0_checkpoint
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(["export", str(ck), "--format", "onnx", "--out", str(out)], capsys)
    assert code == 0, err
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") >= 2 * 2  # fused q/k/v, o, fused gate/up, down per layer (2 layers)
    code, _, err = run_cli(["export", str(ck), "--format", "onnx", "--type", "q4_0", "--out", str(tmp_path / "n.onnx")], capsys)
    assert code == 2 and "--type applies to --format gguf only" in err


@pytest.mark.parametrize("recipe,needle", [
    ("rtn-w4g64", "groups are 64 columns, q4_1 blocks are 32 columns"),
    ("rtn-w8", "groups are whole rows, q8_0 blocks are 32 columns"),
    ("streamingllm512", "policy runs in leanfm's decode loop"),
    ("svd70", "not svd's two factors"),
    ("smoothquant-w8a8", "quantizes activations"),
])
def test_a_recipe_the_runtime_cannot_run_is_refused_before_any_work(tiny_model_dir, tiny_text, tmp_path, capsys, recipe, needle):
    pytest.importorskip("llama_cpp")
    code, _, err = run_cli(["bench", "--model", str(tiny_model_dir), "--dataset", str(tiny_text), "--recipe", recipe,
                            "--runtime", "llama.cpp", "--out", str(tmp_path / "x"), *FAST], capsys)
    assert code == 2 and needle in err and f"recipe {recipe}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "results.json").exists()
