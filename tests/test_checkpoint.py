"""Packed checkpoints: leanfm format reloads without calibration; compressed-tensors export reloads
in plain transformers with the same logits as leanfm's quantized model."""
from __future__ import annotations

import pytest
import torch

import leanfm
from leanfm.errors import LeanfmError
from leanfm.kernels.checkpoint import load_quantized, quantized_layers, save_quantized
from leanfm.kernels.lowrank import LowRankLinear
from leanfm.models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import tiny_llama

CFGS = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "rtn", "bits": 8},
    {"method": "hqq", "bits": 4, "group_size": 32},
    {"method": "rtn", "bits": 3, "backend": "reference"},
]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c['method']}-{c['bits']}")
def test_leanfm_checkpoint_roundtrip(cfg, tmp_path):
    model = leanfm.apply_(tiny_llama(), cfg)
    ids = torch.randint(3, 250, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_quantized(model, tmp_path)
    back = load_quantized(tmp_path)
    q0, q1 = quantized_layers(model), quantized_layers(back)
    assert len(q0) == 14 and list(q0) == list(q1) and [m.backend.name for m in q0.values()] == [m.backend.name for m in q1.values()]
    for a, b in zip(q0.values(), q1.values()):
        qa, qb = a.quantized_weight(), b.quantized_weight()
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tie restored


@pytest.mark.parametrize("bf16_values", [True, False], ids=["bf16-exact", "fp32-values"])
def test_an_untied_bf16_exact_embedding_is_held_in_bf16_with_the_same_logits(bf16_values, tmp_path):
    model = tiny_llama(tie=False)
    emb = model.model.embed_tokens.weight
    if bf16_values:  # as a model shipped in bf16 and upcast by leanfm
        emb.data = emb.data.bfloat16().float()
    model = leanfm.apply_(model, CFGS[0])
    ids = torch.randint(3, 250, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_quantized(model, tmp_path)
    back = load_quantized(tmp_path)
    table = back.model.embed_tokens.weight
    assert table.dtype == (torch.bfloat16 if bf16_values else torch.float32)
    assert torch.equal(table.float(), emb.float())
    assert back.lm_head.weight.dtype == torch.float32  # the head's GEMM stays fp32
    with torch.no_grad():
        out = back(input_ids=ids)
    assert out.logits.dtype == torch.float32 and torch.equal(out.logits, ref)
    again = tmp_path / "again"  # saved again (lossless either way) and loaded: the same numbers
    save_quantized(back, again)
    with torch.no_grad():
        assert torch.equal(load_quantized(again)(input_ids=ids).logits, ref)


def test_compressed_tensors_export_matches_leanfm_logits(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = leanfm.apply_(tiny_llama(), {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "backend": "reference"},
                          calib=torch.randint(3, 250, (4, 64)))
    save_checkpoint(model, tmp_path, fmt="compressed-tensors")
    other = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 24))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, other(input_ids=ids).logits
    # reference backend = exact fp32 dequant on both sides; only summation order may differ
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("cfg,files", [
    ({"method": "rtn", "bits": 4, "group_size": 32}, {"leanfm-quant.json"}),
    ({"method": "svd", "param_ratio": 0.6}, {"leanfm-lowrank.json"}),
    ({"method": "magnitude", "sparsity": 0.5}, set()),
], ids=["quant", "lowrank", "plain"])
def test_save_checkpoint_picks_the_format_and_load_checkpoint_its_loader(cfg, files, tmp_path):
    model = leanfm.apply_(tiny_llama(), cfg)
    save_checkpoint(model, tmp_path)
    manifests = {p.name for p in tmp_path.glob("leanfm-*.json")}
    assert manifests == files and (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    back = load_checkpoint(tmp_path)
    assert len(quantized_layers(back)) == len(quantized_layers(model))
    assert sum(isinstance(m, LowRankLinear) for m in back.modules()) == sum(isinstance(m, LowRankLinear) for m in model.modules())
    ids = torch.randint(3, 250, (1, 16))
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_compressed_tensors_needs_packed_layers(tmp_path):
    with pytest.raises(LeanfmError, match="recipe x leaves no packed quantized layers"):
        save_checkpoint(tiny_llama(), tmp_path, fmt="compressed-tensors", source="recipe x")


# --- writing checkpoints: temp folder + rename, refuse or replace an existing one ------------

import os  # noqa: E402

from leanfm.models import checkpoint as ckpt_mod  # noqa: E402
from leanfm.models.checkpoint import check_checkpoint_target  # noqa: E402

QUANT = {"method": "rtn", "bits": 4, "group_size": 32}
LOWRANK = {"method": "svd", "param_ratio": 0.6}


def _siblings(d):
    """Temp/old folders left next to ``d``."""
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def test_save_into_an_existing_checkpoint_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "ck"
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(LeanfmError) as e:
        save_checkpoint(leanfm.apply_(tiny_llama(), LOWRANK), out)
    assert str(e.value) == (f"checkpoint folder {out} already exists and is not empty; pass --overwrite to replace it as a whole, "
                            "or choose another --out")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before and _siblings(out) == []


@pytest.mark.parametrize("fmt", ["leanfm", "compressed-tensors"])
def test_overwrite_replaces_the_whole_folder(fmt, tmp_path):
    """The old leanfm-quant.json (and any other file) must not survive next to the new checkpoint."""
    out = tmp_path / "ck"
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out, extra_files={"recipe.yaml": "name: old\n"})
    (out / "notes.txt").write_text("stale")
    model = leanfm.apply_(tiny_llama(), LOWRANK if fmt == "leanfm" else {"method": "rtn", "bits": 8})
    assert save_checkpoint(model, out, fmt=fmt, overwrite=True, extra_files={"recipe.yaml": "name: new\n"}) == out
    names = {p.name for p in out.iterdir()}
    assert "leanfm-quant.json" not in names and "notes.txt" not in names
    assert (out / "recipe.yaml").read_text() == "name: new\n"  # extra files land in the final folder
    assert ("leanfm-lowrank.json" in names) == (fmt == "leanfm")
    assert _siblings(out) == []
    if fmt == "leanfm":
        back = load_checkpoint(out)
        assert sum(isinstance(m, LowRankLinear) for m in back.modules()) > 0 and not quantized_layers(back)


def test_save_into_an_empty_existing_folder(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out)
    assert (out / "leanfm-quant.json").exists() and _siblings(out) == []


def test_a_failed_write_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    def crash(model, out, *a):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk vanished")

    new, old = tmp_path / "new", tmp_path / "old"
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), old)
    before = sorted(p.name for p in old.iterdir())
    monkeypatch.setattr(ckpt_mod, "_write", crash)
    for out, overwrite in ((new, False), (old, True)):
        with pytest.raises(RuntimeError, match="disk vanished"):
            save_checkpoint(tiny_llama(), out, overwrite=overwrite)
        assert _siblings(out) == []
    assert not new.exists()
    assert sorted(p.name for p in old.iterdir()) == before  # the old checkpoint is untouched
    load_checkpoint(old)


def test_an_os_error_while_writing_is_one_line(tmp_path, monkeypatch):
    import errno

    def full(model, out, *a):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(ckpt_mod, "_write", full)
    out = tmp_path / "ck"
    with pytest.raises(LeanfmError, match=f"could not write checkpoint folder {out}: no space left on the device; nothing was replaced"):
        save_checkpoint(tiny_llama(), out)
    assert not out.exists() and _siblings(out) == []


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "ck"
    dead = tmp_path / ".ck.partial-999999999"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out)
    assert not dead.exists() and _siblings(out) == []


def test_the_temp_folder_is_a_hidden_sibling(tmp_path, monkeypatch):
    seen = []
    real = ckpt_mod._write

    def spy(model, out, *a):
        seen.append(out)
        real(model, out, *a)

    monkeypatch.setattr(ckpt_mod, "_write", spy)
    out = tmp_path / "ck"
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out)
    assert seen == [tmp_path / f".ck.partial-{os.getpid()}"]


@pytest.mark.parametrize("case,overwrite,needle", [
    ("file", False, "exists as a file"),
    ("file", True, "exists as a file"),
    ("under a file", False, "is a file, not a folder"),
    ("not a checkpoint", True, "holds no checkpoint"),
    ("working directory", True, "holds the working directory"),
    ("non-empty", False, "pass --overwrite"),
])
def test_check_checkpoint_target_refuses(case, overwrite, needle, tmp_path, monkeypatch):
    if case == "file":
        out = tmp_path / "ck"
        out.write_text("x")
    elif case == "under a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "sub" / "ck"
    elif case == "not a checkpoint":
        out = tmp_path / "docs"
        out.mkdir()
        (out / "thesis.tex").write_text("x")
    elif case == "working directory":
        out = tmp_path / "ck"
        out.mkdir()
        (out / "config.json").write_text("{}")
        monkeypatch.chdir(out)
        out = "."
    else:
        out = tmp_path / "ck"
        out.mkdir()
        (out / "config.json").write_text("{}")
    with pytest.raises(LeanfmError, match=needle) as e:
        check_checkpoint_target(out, overwrite)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LeanfmError, match=needle):  # save_checkpoint runs the same check first
        save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), out, overwrite=overwrite)


@pytest.mark.parametrize("case", ["missing", "missing parents", "empty", "checkpoint with overwrite"])
def test_check_checkpoint_target_accepts(case, tmp_path):
    out = tmp_path / ("a/b/ck" if case == "missing parents" else "ck")
    if case in ("empty", "checkpoint with overwrite"):
        out.mkdir()
    if case == "checkpoint with overwrite":
        (out / "config.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    check_checkpoint_target(out, overwrite=case == "checkpoint with overwrite")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # creates nothing, leaves no probe behind


def test_unwritable_parent_is_refused(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(LeanfmError, match=f"cannot write checkpoint folder {tmp_path / 'ck'}: {tmp_path} is not writable "
                                          r"\(permission denied\)"):
        check_checkpoint_target(tmp_path / "ck", False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LeanfmError, match="is not writable"):
            save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), ro / "ck")
    finally:
        ro.chmod(0o755)


def test_extra_file_names_must_be_plain(tmp_path):
    with pytest.raises(LeanfmError, match="must be a plain file name"):
        save_checkpoint(tiny_llama(), tmp_path / "ck", extra_files={"../escape.yaml": "x"})
    assert not (tmp_path / "ck").exists()


def test_save_into_an_empty_working_directory_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "here"
    out.mkdir()
    ino = out.stat().st_ino
    monkeypatch.chdir(out)
    save_checkpoint(leanfm.apply_(tiny_llama(), QUANT), ".")
    assert out.stat().st_ino == ino and (out / "leanfm-quant.json").exists() and _siblings(out) == []
