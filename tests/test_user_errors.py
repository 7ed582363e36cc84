"""The catalogue of bad input a new user tried (issue 13): every case exits 2 with ONE line that
names the problem and the fix, prints no traceback, and leaves earlier results intact.

Each CLI case runs in a scratch folder holding an earlier run's results (``prior/results.json``
and ``ckpt/``, a packed checkpoint); both must be byte-identical afterwards. Cases that need a
file (a truncated checkpoint, a binary dataset, ...) build it in ``setup``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from leanfm import cli

FAST = ["--seqlen", "64", "--prompt", "8", "--gen", "4", "--repeats", "2", "--threads", "1", "--max-eval-tokens", "512"]


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".leanfm.lock"}


@pytest.fixture(scope="module")
def packed_ckpt(tiny_model_dir, tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("packed") / "ckpt"
    assert cli.main(["compress", "--model", str(tiny_model_dir), "--recipe", "rtn-w8", "--out", str(ck), "--threads", "1"]) == 0
    return ck


@pytest.fixture
def scene(tmp_path, packed_ckpt, tiny_model_dir, tiny_text, monkeypatch):
    """A scratch folder with earlier results, a checkpoint, the tiny model and its text."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path / "cache"))  # no default data folder: the machine's must not matter
    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "results.json").write_text(json.dumps({"schema_version": "1.1", "environment": {}, "protocol": {}, "runs": []}))
    (prior / "report.html").write_text("<html>earlier</html>")
    shutil.copytree(packed_ckpt, tmp_path / "ckpt")
    return {"tmp": tmp_path, "model": str(tiny_model_dir), "text": str(tiny_text)}


def _truncated(s):
    ck = s["tmp"] / "trunc"
    shutil.copytree(s["tmp"] / "ckpt", ck)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return ck


def _garbage_manifest(s):
    ck = s["tmp"] / "garbage"
    shutil.copytree(s["tmp"] / "ckpt", ck)
    (ck / "leanfm-quant.json").write_text("{this is not json")
    return ck


def _no_tokenizer(s):
    d = s["tmp"] / "notok"
    shutil.copytree(s["model"], d)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    return d


def _no_config(s):
    d = s["tmp"] / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    return d


def _binary(s):
    p = s["tmp"] / "noise.txt"
    p.write_bytes(os.urandom(20000))
    return p


def _empty(s):
    p = s["tmp"] / "empty.txt"
    p.write_text("")
    return p


def _out_file(s):
    p = s["tmp"] / "a-file"
    p.write_text("not a folder")
    return p


def _yaml(text):
    def make(s):
        p = s["tmp"] / "r.yaml"
        p.write_text(text)
        return p
    return make


def _list_results(text):
    def make(s):
        d = s["tmp"] / "odd"
        d.mkdir()
        (d / "results.json").write_text(text)
        return d
    return make


def _empty_data_dir(s):
    d = s["tmp"] / "nodata"
    d.mkdir()
    return d


M, T = "{model}", "{text}"
B = ["bench", "--model", M, "--dataset", T, "--seqlen", "64"]
E = ["eval", "--dataset", T]

# (id, argv with {model}/{text}/{x} placeholders, setup making {x}, needles in the one error line)
CLI_CASES = [
    ("out-is-a-file", B + ["--out", "{x}"], _out_file, ["is a file"]),
    ("out-unwritable", B + ["--out", "/proc/leanfm-cannot/x"], None, ["cannot write", "/proc/leanfm-cannot/x"]),
    ("out-holds-results", B + ["--out", "prior"], None, ["already holds results", "--overwrite"]),
    ("eval-out-holds-results", E + ["--model", "ckpt", "--out", "prior"], None, ["already holds results", "--overwrite"]),
    ("compress-into-checkpoint", ["compress", "--model", M, "--recipe", "rtn-w4", "--out", "ckpt"], None, ["ckpt", "--overwrite"]),
    ("compress-out-is-a-file", ["compress", "--model", M, "--recipe", "rtn-w4", "--out", "{x}"], _out_file, ["a-file"]),
    ("compress-out-unwritable", ["compress", "--model", M, "--recipe", "rtn-w4", "--out", "/proc/leanfm-cannot/ck"], None,
     ["/proc/leanfm-cannot"]),
    ("truncated-safetensors", E + ["--model", "{x}", "--out", "o"], _truncated, ["model.safetensors"]),
    ("garbage-quant-manifest", E + ["--model", "{x}", "--out", "o"], _garbage_manifest, ["leanfm-quant.json"]),
    ("missing-tokenizer", E + ["--model", "{x}", "--out", "o"], _no_tokenizer, ["tokenizer"]),
    ("dir-without-config", E + ["--model", "{x}", "--out", "o"], _no_config, ["config.json"]),
    ("nonexistent-local-path", B + ["--model", "./no-such-model", "--out", "o"], None, ["no-such-model", "does not exist"]),
    ("nonexistent-abs-path", B + ["--model", "/tmp/leanfm-no-such/dir", "--out", "o"], None, ["does not exist"]),
    ("unknown-alias", B + ["--model", "smollm9-1t", "--out", "o"], None, ["smollm9-1t"]),
    ("report-on-list", ["report", "{x}"], _list_results("[]"), ["results.json"]),
    ("report-on-empty-object", ["report", "{x}"], _list_results("{}"), ["results.json"]),
    ("report-on-bad-runs", ["report", "{x}"], _list_results('{"schema_version": "1.1", "runs": 5}'), ["runs"]),
    ("report-not-json", ["report", "{x}"], _list_results("{oops"), ["not valid JSON"]),
    ("report-missing", ["report", "nowhere"], None, ["no results.json"]),
    ("predict-json-unwritable", ["predict", "--model", "llama-3.1-70b", "--json", "/proc/leanfm-cannot/p.json"], None,
     ["/proc/leanfm-cannot/p.json"]),
    ("predict-beyond-context", ["predict", "--model", "smollm2-135m", "--prompt", "200000"], None, ["context"]),
    ("predict-unknown-hardware", ["predict", "--model", "llama-3.1-70b", "--hardware", "h900"], None, ["h900"]),
    ("predict-batch-zero", ["predict", "--model", "llama-3.1-70b", "--batch", "0"], None, ["batch"]),
    ("predict-acceptance", ["predict", "--model", "llama-3.1-70b", "--recipe", "self-spec", "--acceptance-rate", "1.5"], None,
     ["acceptance"]),
    ("max-eval-tokens-zero", B + ["--max-eval-tokens", "0"], None, ["--max-eval-tokens", "all"]),
    ("metrics-empty", B + ["--metrics", ""], None, ["--metrics", "empty"]),
    ("metrics-unknown", B + ["--metrics", "speed,vibes", "--out", "o"], None, ["vibes"]),
    ("threads-beyond-cores", B + ["--threads", "999", "--out", "o"], None, ["--threads 999", "cores"]),
    ("seqlen-zero", B + ["--seqlen", "0", "--out", "o"], None, ["--seqlen"]),
    ("repeats-negative", B + ["--repeats", "-1", "--out", "o"], None, ["--repeats"]),
    ("calib-samples-zero", B + ["--calib-samples", "0"], None, ["--calib-samples"]),
    ("binary-dataset", ["bench", "--model", M, "--dataset", "{x}", "--out", "o"], _binary, ["noise.txt", "text"]),
    ("empty-dataset", ["bench", "--model", M, "--dataset", "{x}", "--out", "o"], _empty, ["empty.txt", "empty"]),
    ("missing-dataset-file", ["bench", "--model", M, "--dataset", "nope.txt", "--out", "o"], None, ["nope.txt"]),
    ("wikitext-split-train", ["bench", "--model", M, "--split", "train", "--out", "o"], None, ["train"]),
    ("wikitext-no-data-dir", ["bench", "--model", M, "--data-dir", "{x}", "--out", "o"], _empty_data_dir, ["LEANFM_DATA_DIR"]),
    ("unknown-calibration-set", B + ["--recipe", "gptq-w4", "--calib-dataset", "no-such-corpus", "--out", "o"], None,
     ["no-such-corpus"]),
    ("recipe-quantizes-twice", B + ["--recipe", "rtn-w8+gptq-w4", "--out", "o"], None, ["quantizes the weights twice"]),
    ("two-decoding-policies", B + ["--recipe", "self-spec+early-exit", "--out", "o"], None, ["two decoding policies"]),
    ("unknown-recipe", B + ["--recipe", "rtn-w5", "--out", "o"], None, ["unknown recipe 'rtn-w5'"]),
    ("recipe-bad-yaml", B + ["--recipe", "{x}", "--out", "o"], _yaml("name: x\nsteps: [\n"), ["r.yaml", "malformed YAML"]),
    ("recipe-unknown-method", B + ["--recipe", "{x}", "--out", "o"], _yaml("name: x\nsteps:\n  - {method: quantum}\n"),
     ["quantum"]),
    ("recipe-bad-param", B + ["--recipe", "{x}", "--out", "o"], _yaml("name: x\nsteps:\n  - {method: rtn, bits: 99}\n"),
     ["bits"]),
    ("group-size-not-dividing", B + ["--recipe", "{x}", "--out", "o"],
     _yaml("name: x\nsteps:\n  - {method: rtn, bits: 4, group_size: 100}\n"), ["group_size"]),
    ("hardware-profile-missing", B + ["--hardware-profile", "nope.yaml", "--out", "o"], None, ["nope.yaml"]),
    ("compress-bad-format", ["compress", "--model", M, "--recipe", "rtn-w4", "--out", "x", "--format", "gguf2"], None,
     ["--format"]),
    ("compress-threads-zero", ["compress", "--model", M, "--recipe", "rtn-w4", "--out", "x", "--threads", "0"], None,
     ["--threads"]),
]


@pytest.mark.parametrize("argv,setup,needles", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(scene, capsys, argv, setup, needles):
    x = setup(scene) if setup else None
    before = {k: digest(scene["tmp"] / k) for k in ("prior", "ckpt")}
    args = [a.format(model=scene["model"], text=scene["text"], x=x) for a in argv]
    t0 = time.perf_counter()
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, (code, out.out[-500:], err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert {k: digest(scene["tmp"] / k) for k in ("prior", "ckpt")} == before, "earlier results changed"
    assert not (scene["tmp"] / "o" / "results.json").exists(), "a refused run wrote results"
    assert time.perf_counter() - t0 < 60, "refused too late: input must be checked before the work"


def test_two_runs_into_one_folder_are_excluded(scene, capsys):
    """A second writer aimed at a folder a running bench holds is refused at once."""
    out = scene["tmp"] / "busy"
    out.mkdir()
    fd = os.open(out / ".leanfm.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running bench holds
    try:
        code, _, err = run_cli(["bench", "--model", scene["model"], "--dataset", scene["text"], "--out", out, *FAST], capsys)
    finally:
        os.close(fd)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another leanfm run (pid 4242)" in err, err


def test_overwrite_replaces_results_and_stale_files(scene, capsys):
    prior = scene["tmp"] / "prior"
    (prior / "recipes").mkdir()
    (prior / "recipes" / "stale.yaml").write_text("name: stale\n")
    code, _, err = run_cli(["bench", "--model", scene["model"], "--dataset", scene["text"], "--recipe", "baseline",
                            "--metrics", "quality", "--out", prior, "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert not (prior / "recipes" / "stale.yaml").exists() and (prior / "recipes" / "baseline.yaml").exists()
    assert json.loads((prior / "results.json").read_text())["runs"][0]["status"] == "ok"


def test_compress_overwrite_leaves_no_stale_manifest(scene, capsys):
    ck = scene["tmp"] / "ckpt"
    assert (ck / "leanfm-quant.json").exists()
    code, _, err = run_cli(["compress", "--model", scene["model"], "--recipe", "magnitude50", "--out", ck, "--overwrite",
                            "--threads", "1"], capsys)
    assert code == 0, err
    assert not (ck / "leanfm-quant.json").exists(), "stale manifest of the earlier checkpoint survived"
    assert "magnitude50" in (ck / "recipe.yaml").read_text()
    assert not [p for p in ck.parent.iterdir() if ".partial" in p.name], "temporary folder left behind"
    code, _, err = run_cli(["eval", "--model", ck, "--dataset", scene["text"], "--metrics", "quality", "--out", "ev", *FAST], capsys)
    assert code == 0, err


def test_eval_of_a_checkpoint_is_not_called_baseline(scene, capsys):
    code, stdout, err = run_cli(["eval", "--model", scene["tmp"] / "ckpt", "--dataset", scene["text"], "--metrics", "quality",
                                 "--out", "ev", *FAST], capsys)
    assert code == 0, err
    run = json.loads((scene["tmp"] / "ev" / "results.json").read_text())["runs"][0]
    assert run["recipe"]["name"] == "rtn-w8 (checkpoint)"
    assert "top1_agreement" not in run["metrics"] and "kl_to_baseline" not in run["metrics"]
    assert "baseline" not in stdout.split("recipe", 1)[-1].split("results:")[0]


# ---- the Python API -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    import leanfm
    from tests.conftest import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.leanfm_info = {"steps": [], "tokenizer": tok}
    return leanfm, model, tok


API_CASES = [
    ("apply-int", lambda L, m, t: L.apply_(m, 42), ["not int 42"]),
    ("apply-none", lambda L, m, t: L.apply_(m, None), ["NoneType"]),
    ("apply-to-non-model", lambda L, m, t: L.apply_(42, "rtn-w8"), ["nn.Module"]),
    ("apply-unknown-method", lambda L, m, t: L.apply_(m, {"method": "quantum"}), ["quantum"]),
    ("apply-bad-bits", lambda L, m, t: L.apply_(m, {"method": "rtn", "bits": 99}), ["bits"]),
    ("apply-unknown-recipe", lambda L, m, t: L.apply_(m, "rtn-w5"), ["rtn-w5"]),
    ("apply-calib-missing", lambda L, m, t: L.apply_(m, "gptq-w4"), ["calib"]),
    ("apply-calib-wrong-type", lambda L, m, t: L.apply_(m, "gptq-w4", calib="wiki"), ["calib"]),
    ("measure-unknown-setting", lambda L, m, t: L.measure(m, t, bogus=1), ["bogus"]),
    ("measure-no-groups", lambda L, m, t: L.measure(m, t, groups=()), ["metric group"]),
    ("measure-threads", lambda L, m, t: L.measure(m, t, threads=999), ["--threads 999"]),
    ("measure-protocol-type", lambda L, m, t: L.measure(m, t, "wikitext2"), ["Protocol"]),
    ("calibration-zero", lambda L, m, t: L.calibration(n=0), ["n >= 1"]),
    ("load-missing-path", lambda L, m, t: L.load("./no-such-model"), ["does not exist"]),
    ("recipe-twice", lambda L, m, t: L.load_recipe("rtn-w8+rtn-w4"), ["twice"]),
]


@pytest.mark.parametrize("call,needles", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(tiny, call, needles):
    leanfm, model, tok = tiny
    with pytest.raises(leanfm.LeanfmError) as e:
        call(leanfm, model, tok)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_measure_is_callable_after_load_imports_the_package():
    import importlib

    import leanfm

    importlib.import_module("leanfm.measure.run")
    importlib.import_module("leanfm.predict.analyzer")
    assert callable(leanfm.measure) and callable(leanfm.predict)
    assert leanfm.measure.Protocol is leanfm.Protocol


def test_hub_id_offline_fails_fast(scene, capsys, monkeypatch):
    """No network to the hub: one line within seconds, not ~20 retry lines over 49 s."""
    from leanfm.models import load as load_mod

    monkeypatch.setattr(load_mod, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(scene["tmp"] / "hf"))  # an empty hub cache
    t0 = time.perf_counter()
    code, _, err = run_cli(["bench", "--model", "some-org/some-model", "--dataset", scene["text"], "--out", "o", *FAST], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot reach the Hugging Face hub" in err and "some-org/some-model" in err and "local model directory" in err, err
    assert time.perf_counter() - t0 < 10


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose head is scaled up, so its greedy tokens have clear margins
    (random tiny models have near-uniform logits, where any kernel would look like a near-tie)."""
    import torch

    from tests.conftest import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("sharp")
    tok = tiny_tokenizer()
    model = tiny_llama(hidden=64, layers=2, inter=128, vocab=len(tok), tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def test_bench_fails_when_the_decode_kernel_reads_a_wrong_layout(sharp_model_dir, tiny_text, tmp_path, capsys, monkeypatch):
    """int8pack whose packer stores rows in another order than its kernel reads (its unpacker
    undoes it, so dequantized weights and perplexity stay right): bench must refuse to report it
    as a real kernel, not print a perplexity."""
    import torch

    from leanfm.kernels import backends as B

    pack, codes = B.Int8Pack.pack, B.Int8Pack.codes

    def perm(n):
        return torch.roll(torch.arange(n), 1)

    def bad_pack(self, qw):
        bufs = pack(self, qw)
        bufs["qweight"] = bufs["qweight"][perm(bufs["qweight"].shape[0])].contiguous()
        return bufs

    def bad_codes(self, bufs, lay):
        c = codes(self, bufs, lay)
        return c[torch.argsort(perm(c.shape[0]))]

    monkeypatch.setattr(B.Int8Pack, "pack", bad_pack)
    monkeypatch.setattr(B.Int8Pack, "codes", bad_codes)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["bench", "--model", sharp_model_dir, "--dataset", tiny_text, "--recipe", "rtn-w8",
                                 "--metrics", "quality", "--out", out, *FAST], capsys)
    assert code == 2, (stdout, err)
    assert len(err.strip().splitlines()) == 1 and "decode-kernel check failed" in err and "int8pack" in err, err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0]["status"] == "ok" and runs[1]["status"] == "error"
    assert "perplexity" not in runs[1].get("metrics", {}) and "flags" not in runs[1], runs[1]
    monkeypatch.setattr(B.Int8Pack, "pack", pack)  # the same run with the right layout passes and records the check
    monkeypatch.setattr(B.Int8Pack, "codes", codes)
    code, _, err = run_cli(["bench", "--model", sharp_model_dir, "--dataset", tiny_text, "--recipe", "rtn-w8",
                            "--metrics", "quality", "--out", out, "--overwrite", *FAST], capsys)
    assert code == 0, err
    check = json.loads((out / "results.json").read_text())["runs"][1]["details"]["decode_check"]
    assert check["hard_mismatches"] == 0 and check["tokens_checked"] > 0
