"""Compressing a model larger than memory: one decoder layer in RAM at a time (issue 16).

The onloaded path must give exactly what the in-memory path gives (same codes, same tensors),
from fp32 and bf16 sources, with calibration activations in memory or spilled to disk; refuse
what would not fit before any work; and never leave a half-written checkpoint."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import leanfm
from leanfm import cli
from leanfm.formats.tensorfiles import TensorIndex
from leanfm.models.checkpoint import save_checkpoint
from leanfm.onload_compress import compress_onloaded
from leanfm.recipe import load_recipe, parse_recipe
from tests.conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same tiny model saved in fp32 and in bf16 (sharded, as large checkpoints are)."""
    root = tmp_path_factory.mktemp("onload")
    tok = tiny_tokenizer()
    out = {}
    for dtype, shard in (("fp32", None), ("bf16", "200KB")):
        m = tiny_llama(hidden=576, layers=3, heads=9, kv_heads=3, inter=128, vocab=len(tok), tie=dtype == "fp32")
        if dtype == "bf16":
            m = m.to(torch.bfloat16)
        d = root / dtype
        m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(d)
        out[dtype] = d
    (root / "text.txt").write_text(SAMPLE_TEXT * 3)
    out["text"] = root / "text.txt"
    return out


def _ids(n: int = 4, seqlen: int = 64) -> torch.Tensor:
    return torch.randint(3, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _same_files(a: Path, b: Path) -> list[str]:
    ia, ib = TensorIndex(a), TensorIndex(b)
    assert sorted(ia.names()) == sorted(ib.names())
    return [n for n in ia.names() if not torch.equal(ia.read(n), ib.read(n))]


@pytest.mark.parametrize("source", ["fp32", "bf16"])
@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w4g64", "gptq-w4g64+emb8", "hqq-w4g64", "awq-w4g64", "smoothquant-w8a8",
                                    "wanda50", "sparsegpt-2:4", "layerdrop25"])
def test_onloaded_equals_in_memory(sources, tmp_path, source, recipe):
    """Bit-identical tensors (codes, scales, the rest) and logits to the in-memory path, which
    reads the same file upcast to fp32 as a whole."""
    r = load_recipe(recipe)
    tok = leanfm.load(str(sources[source]))[1]
    model, _ = leanfm.load(str(sources[source]))
    leanfm.apply_(model, r, calib=_ids())
    save_checkpoint(model, tmp_path / "mem", tok)
    skel = compress_onloaded(sources[source], r, _ids(), tmp_path / "onl", tok)
    assert _same_files(tmp_path / "mem", tmp_path / "onl") == []
    assert any(f.name.startswith("layer-") for f in (tmp_path / "onl").iterdir())  # written layer by layer
    assert [s["method"] for s in skel.leanfm_info["steps"]] == [s.method for s in r.steps]
    m0, m1 = leanfm.load(str(tmp_path / "mem"))[0], leanfm.load(str(tmp_path / "onl"))[0]
    x = _ids(1, 16)
    assert torch.equal(m0(x).logits, m1(x).logits)


@pytest.mark.parametrize("source,recipe,head", [("bf16", "gptq-w4g64", "lm_head"), ("bf16", "gptq-w4g64+emb8", None),
                                                ("fp32", "gptq-w4g64", None)])
def test_an_untied_head_no_step_touches_is_read_after_the_layers(sources, source, recipe, head):
    """bf16 is saved untied, fp32 tied (the head is the embedding); emb8 changes the outside
    modules, so the head stays in memory throughout. The plan then has a final phase."""
    from leanfm.models.onload import Onloaded
    from leanfm.onload_compress import deferred_head
    from leanfm.predict.arch import load_arch
    from leanfm.predict.memory_plan import plan

    r = load_recipe(recipe)
    assert deferred_head(Onloaded(sources[source]), r) == head
    assert deferred_head(Onloaded(sources[source]), parse_recipe("name: all\nsteps:\n  - method: rtn\n    skip: []\n")) is None
    arch = load_arch(str(sources[source]))
    p = plan(arch, r.steps, 4, 64, 10**6, onload=True, defer_head=head is not None)
    whole = plan(arch, r.steps, 4, 64, 10**6, onload=True)
    emb = arch.vocab * arch.hidden * 4
    if head:
        assert p.parts["head, at the end"] == emb and p.parts["outside layers"] == whole.parts["outside layers"] - emb
        steady = sum(v for k, v in p.parts.items() if k != "head, at the end")
        assert p.total == max(steady, 10**6 + whole.parts["outside layers"]) and p.total <= whole.total
    else:
        assert "head, at the end" not in p.parts and p.total == whole.total


def test_spilled_activations_give_the_same_codes(sources, tmp_path):
    tok = leanfm.load(str(sources["fp32"]))[1]
    r = load_recipe("gptq-w4g64")
    compress_onloaded(sources["fp32"], r, _ids(6), tmp_path / "mem-acts", tok)
    compress_onloaded(sources["fp32"], r, _ids(6), tmp_path / "disk-acts", tok, activation_budget=1000)
    assert _same_files(tmp_path / "mem-acts", tmp_path / "disk-acts") == []


def _compress(sources, out, *extra) -> int:
    return cli.main(["compress", "--model", str(sources["fp32"]), "--recipe", "gptq-w4g64", "--out", str(out),
                     "--calib-dataset", str(sources["text"]), "--calib-samples", "4", "--calib-seqlen", "64",
                     "--threads", "1", *extra])


def test_cli_prints_the_plan_and_onloads_when_asked(sources, tmp_path, capsys):
    assert _compress(sources, tmp_path / "o", "--onload", "always", "--max-memory", "8GB") == 0
    out = capsys.readouterr().out
    assert "memory plan (onloaded" in out and "base" in out and "peak RSS" in out and "planned" in out
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    m, _ = leanfm.load(str(tmp_path / "o"))
    assert m(_ids(1, 8)).logits.shape[-1] == 300


def test_max_memory_below_one_layer_is_refused_before_any_work(sources, tmp_path, capsys):
    code = _compress(sources, tmp_path / "o", "--max-memory", "10MB")
    err = capsys.readouterr().err
    assert code == 2 and "below what one decoder layer needs: at least" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


@pytest.mark.parametrize("bad,needle", [
    ("--max-memory=6 apples", "is not a size"),
    ("--max-memory=-1GB", "is not a size"),
])
def test_bad_max_memory_is_one_line(sources, tmp_path, capsys, bad, needle):
    code = _compress(sources, tmp_path / "o", bad)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_recipe_that_needs_the_whole_model_is_refused_onloaded(sources, tmp_path, capsys):
    code = cli.main(["compress", "--model", str(sources["fp32"]), "--recipe", "svd70", "--out", str(tmp_path / "o"),
                     "--onload", "always", "--calib-dataset", str(sources["text"]), "--calib-samples", "2", "--calib-seqlen", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the whole model in memory" in err and len(err.strip().splitlines()) == 1, err


def test_onloading_to_another_format_is_refused_before_calibration(sources, tmp_path, capsys):
    # a calibration file that does not exist: the refusal must come before anything reads it
    code = cli.main(["compress", "--model", str(sources["fp32"]), "--recipe", "rtn-q4_0", "--out", str(tmp_path / "o.gguf"),
                     "--format", "gguf", "--onload", "always", "--calib-dataset", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "--format gguf is written from a model in memory" in err and len(err.strip().splitlines()) == 1, err


def _damaged(sources, tmp_path, how: str) -> Path:
    import shutil

    d = tmp_path / how
    shutil.copytree(sources["bf16"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / sorted(set(index["weight_map"].values()))[-1]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "missing-shard":
        shard.unlink()
    elif how == "u16":  # rewrite one bf16 tensor's dtype in the header to a 2-byte type leanfm cannot read
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "U16"
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (n - len(text)) if len(text) <= n else b""
        assert len(text) == n
        shard.write_bytes(raw[:8] + text + raw[8 + n:])
    return d


@pytest.mark.parametrize("how,needle", [
    ("truncated", "is truncated"),
    ("missing-shard", "is missing shard"),
    ("u16", "has dtype U16, which leanfm cannot read"),
])
def test_damaged_sources_are_one_line(sources, tmp_path, capsys, how, needle):
    d = _damaged(sources, tmp_path, how)
    code = cli.main(["compress", "--model", str(d), "--recipe", "rtn-w4g64", "--out", str(tmp_path / "o"), "--onload", "always"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "safetensors" in err or "shard" in err  # names the file
    assert not (tmp_path / "o").exists()


def test_an_interrupted_compress_leaves_no_checkpoint(tmp_path):
    """SIGKILL once the first layer is written: nothing at --out, and the same command again
    completes (the dead run's partial folder is removed)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tok = tiny_tokenizer()
    src = tmp_path / "src"
    tiny_llama(hidden=256, layers=24, heads=4, kv_heads=2, inter=512, vocab=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT * 3)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "leanfm.cli", "compress", "--model", str(src), "--recipe", "gptq-w4g64", "--out", str(out),
           "--onload", "always", "--calib-dataset", str(tmp_path / "t.txt"), "--calib-samples", "16", "--calib-seqlen", "128",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LEANFM_PROGRESS": "0"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.name == "layer-00000.safetensors" for d in tmp_path.glob(".ckpt.partial-*") for p in d.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "compress finished before it could be interrupted; give the model more layers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".ckpt.partial-*"))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert out.is_dir() and not list(tmp_path.glob(".ckpt.partial-*"))
    assert len(list(out.glob("layer-*.safetensors"))) == 24


def test_a_configuration_that_needs_every_layer_first_is_refused_onloaded(sources, tmp_path, capsys):
    recipe = tmp_path / "owl.yaml"
    recipe.write_text("name: owl\nseed: 0\nsteps:\n  - {method: wanda, sparsity: 0.5, allocation: owl}\n")
    code = cli.main(["compress", "--model", str(sources["fp32"]), "--recipe", str(recipe), "--out", str(tmp_path / "o"),
                     "--onload", "always", "--calib-dataset", str(sources["text"]), "--calib-samples", "2", "--calib-seqlen", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "allocation: uniform to compress onloaded" in err and len(err.strip().splitlines()) == 1, err


def test_the_plan_counts_one_gptq_hessian_per_distinct_input():
    from leanfm.methods.quantize.decl import GPTQConfig
    from leanfm.predict.arch import load_arch

    arch = load_arch("llama-2-7b")
    lin = [(i, o) for _, i, o, _ in arch.linears()]
    assert arch.layer_inputs() == [0, 0, 0, 1, 2, 2, 3]
    cfg = GPTQConfig(bits=4, group_size=128)
    h, f = 4096, 11008
    # the peak is down_proj's solve: only its own Hessian is left, two f x f working matrices,
    # 3 x its fp32 weight and the codes of the whole layer
    codes = sum(i * o for i, o in lin)
    assert cfg.layer_work_bytes(lin, arch.layer_inputs()) == f * f * 4 * 3 + f * h * 4 * 3 + codes
    # without sharing: the first linear's solve would hold seven Hessians, q/k/v's among them
    assert cfg.layer_work_bytes(lin) >= 6 * h * h * 4 + f * f * 4
