"""Loading models: every damaged file, missing path or unreachable hub is one line naming what is
wrong and how to fix it (never a traceback, never ``internal error``)."""
from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

import leanfm
from leanfm import cli
from leanfm.errors import LeanfmError
from leanfm.models import load as load_mod
from leanfm.models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import tiny_llama, tiny_tokenizer

KINDS = {
    "quant": ({"method": "rtn", "bits": 8}, "leanfm-quant.json"),
    "lowrank": ({"method": "svd", "param_ratio": 0.6}, "leanfm-lowrank.json"),
    "plain": ({"method": "magnitude", "sparsity": 0.5}, None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint (with tokenizer) per format."""
    tok = tiny_tokenizer()
    out = {}
    for kind, (cfg, _) in KINDS.items():
        d = tmp_path_factory.mktemp("ck") / kind
        save_checkpoint(leanfm.apply_(tiny_llama(vocab=len(tok)), cfg), d, tok)
        out[kind] = d
    return out


@pytest.fixture
def copy_of(checkpoints, tmp_path):
    def make(kind: str) -> Path:
        d = tmp_path / f"{kind}-copy"
        shutil.copytree(checkpoints[kind], d)
        return d
    return make


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test here touches the network: the hub probe fails unless a test says otherwise."""
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# --- 1a: truncated / corrupt tensors files -------------------------------------------------

def _truncate(f: Path, how: str) -> None:
    data = f.read_bytes()
    cut = {"empty": b"", "4 bytes": data[:4], "in the header": data[:40], "in the data": data[: len(data) // 2],
           "last byte": data[:-1]}
    if how == "trailing bytes":
        f.write_bytes(data + b"\0" * 16)
    elif how == "garbage header":
        f.write_bytes(data[:8] + b"{" * (len(data) - 8))
    else:
        f.write_bytes(cut[how])


@pytest.mark.parametrize("how", ["empty", "4 bytes", "in the header", "in the data", "last byte", "trailing bytes", "garbage header"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_truncated_or_corrupt_safetensors_names_the_file(kind, how, copy_of):
    d = copy_of(kind)
    _truncate(d / "model.safetensors", how)
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    msg = one_line(e)
    assert str(d / "model.safetensors") in msg and ("truncated" in msg or "corrupt" in msg), msg
    assert "re-run leanfm compress" in msg and "re-download" in msg


@pytest.mark.parametrize("kind", ["quant", "lowrank"])
def test_missing_tensors_file(kind, copy_of):
    d = copy_of(kind)
    (d / "model.safetensors").unlink()
    with pytest.raises(LeanfmError, match="has no model.safetensors; the checkpoint is incomplete") as e:
        load_checkpoint(d)
    assert str(d) in one_line(e)


# --- 1b: damaged manifests ----------------------------------------------------------------

def _first_layer(man: dict) -> dict:
    return next(iter(man["layers"].values()))


QUANT_DAMAGE = {
    "not json": (lambda m: "garbage{", "is not valid JSON"),
    "empty file": (lambda m: "", "is not valid JSON"),
    "a list": (lambda m: [1, 2], "not an object"),
    "no format_version": (lambda m: {"layers": m["layers"]}, "has no format_version"),
    "future version": (lambda m: {**m, "format_version": 99}, "format_version 99"),
    "no layers": (lambda m: {"format_version": 1}, "has no layers"),
    "layers a list": (lambda m: {**m, "layers": []}, "layers that are not an object"),
    "layer a number": (lambda m: {**m, "layers": {"model.layers.0.mlp.up_proj": 3}}, "is not an object"),
    "missing bits": (lambda m: (_first_layer(m).pop("bits"), m)[1], "has no 'bits'"),
    "bits a string": (lambda m: (_first_layer(m).update(bits="eight"), m)[1], 'bits = "eight", expected a positive whole number'),
    "bits a bool": (lambda m: (_first_layer(m).update(bits=True), m)[1], "bits = true"),
    "group_size 0": (lambda m: (_first_layer(m).update(group_size=0), m)[1], "group_size = 0"),
    "bias a string": (lambda m: (_first_layer(m).update(bias="no"), m)[1], 'bias = "no", expected true or false'),
    "backend a number": (lambda m: (_first_layer(m).update(backend=3), m)[1], "backend = 3"),
    "unknown layer": (lambda m: {**m, "layers": {"model.layers.9.mlp.up_proj": _first_layer(m)}}, "names layer 'model.layers.9.mlp.up_proj'"),
    "not a linear": (lambda m: {**m, "layers": {"model.norm": _first_layer(m)}}, "not a linear layer"),
    "wrong bits": (lambda m: (_first_layer(m).update(bits=4), m)[1], "do not match its entry in leanfm-quant.json"),
    "wrong shape": (lambda m: (_first_layer(m).update(out_features=7), m)[1], "do not match its entry"),
}


LOWRANK_DAMAGE = {
    "not json": (lambda m: "{'format_version': 1", "is not valid JSON"),
    "no layers": (lambda m: {"format_version": 1}, "has no layers"),
    "missing rank": (lambda m: (_first_layer(m).pop("rank"), m)[1], "has no 'rank'"),
    "rank a string": (lambda m: (_first_layer(m).update(rank="8"), m)[1], 'rank = "8"'),
    "negative in": (lambda m: (_first_layer(m).update({"in": -1}), m)[1], "in = -1"),
    "unknown layer": (lambda m: {**m, "layers": {"model.nope": _first_layer(m)}}, "names model.nope"),
    "wrong rank": (lambda m: (_first_layer(m).update(rank=_first_layer(m)["rank"] + 1), m)[1], "does not match"),
}


MANIFEST_DAMAGE = [("quant", "leanfm-quant.json", name, *v) for name, v in QUANT_DAMAGE.items()] + \
                  [("lowrank", "leanfm-lowrank.json", name, *v) for name, v in LOWRANK_DAMAGE.items()]


@pytest.mark.parametrize("kind,manifest,change,needle", [c[:2] + c[3:] for c in MANIFEST_DAMAGE],
                         ids=[f"{c[0]}-{c[2]}" for c in MANIFEST_DAMAGE])
def test_damaged_manifest_is_one_line_naming_the_file(kind, manifest, change, needle, copy_of):
    d = copy_of(kind)
    f = d / manifest
    new = change(json.loads(f.read_text()))
    f.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    msg = one_line(e)
    assert needle in msg and str(d) in msg, msg


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("content,needle", [("{oops", "config.json is not valid JSON"), ("[]", "config.json holds a JSON list")])
def test_damaged_config_json_is_not_blamed_on_the_tokenizer(kind, content, needle, copy_of):
    d = copy_of(kind)
    (d / "config.json").write_text(content)
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    msg = one_line(e)
    assert msg.startswith(str(d / "config.json")) and needle in msg and "tokenizer" not in msg


def test_weights_that_do_not_fit_config_json_are_one_line(copy_of, capfd):
    d = copy_of("plain")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    assert one_line(e).startswith(f"the tensors in {d} do not match its config.json (") and "size mismatch" in str(e.value)
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table is held back on failure


# --- 1c: tokenizer ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_directory_without_tokenizer(kind, copy_of):
    d = copy_of(kind)
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    msg = one_line(e)
    assert msg.startswith(f"no tokenizer in {d}")
    assert msg.endswith("copy the tokenizer files (tokenizer.json, tokenizer_config.json) from the source model into it")


def test_broken_tokenizer_file_gives_the_whole_reason(copy_of):
    d = copy_of("quant")
    (d / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(LeanfmError) as e:
        leanfm.load(str(d))
    msg = one_line(e)
    assert msg.startswith(f"could not load the tokenizer in {d}: ") and "copy the tokenizer files" in msg


# --- 1d: local paths that do not exist --------------------------------------------------------

@pytest.mark.parametrize("name", ["./nope", "/tmp/does-not-exist-leanfm", "~/nope-leanfm-xyz", "../nope/x", "a/b/c",
                                  "models/x", "org/name with space"])
def test_missing_local_path_is_not_an_unknown_model(name, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()  # models/x: its first part exists here, so it is a path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: pytest.fail("a local path must not probe the hub"))
    with pytest.raises(LeanfmError) as e:
        leanfm.load(name)
    assert one_line(e).startswith(f"model path '{name}' does not exist")


def test_a_file_is_not_a_model_directory(checkpoints):
    with pytest.raises(LeanfmError, match="is a file; pass the model's directory"):
        leanfm.load(str(checkpoints["plain"] / "config.json"))


def test_unknown_alias_still_says_unknown_model():
    with pytest.raises(LeanfmError, match="unknown model 'no-such-alias'; use an alias"):
        leanfm.load("no-such-alias")


# --- 1e: the hub ------------------------------------------------------------------------------

@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_model(cache: Path, repo: str, src: Path) -> Path:
    """A snapshot of ``src`` in the Hugging Face cache layout, as ``repo`` at revision main."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    return snap


def test_unreachable_hub_fails_fast_without_retries(empty_hf_cache, monkeypatch, capfd):
    monkeypatch.setattr(load_mod, "_from_dir", lambda *a: pytest.fail("must not try to download"))
    t0 = time.perf_counter()
    with pytest.raises(LeanfmError) as e:
        leanfm.load("org/name")
    assert time.perf_counter() - t0 < 2
    assert one_line(e) == ("cannot reach the Hugging Face hub (huggingface.co:443) to download org/name; pass a local model "
                           "directory (or set HF_HUB_OFFLINE=1 if it is cached)")
    assert "Retry" not in capfd.readouterr().err


def test_hub_endpoint_names_hf_endpoint(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    with pytest.raises(LeanfmError, match=r"cannot reach the Hugging Face hub \(mirror.example:8080\)"):
        leanfm.load("org/name")


def test_hf_hub_offline_without_cache_does_not_probe(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: pytest.fail("offline: no probe"))
    with pytest.raises(LeanfmError, match="HF_HUB_OFFLINE is set and org/name is not in the local Hugging Face cache"):
        leanfm.load("org/name")


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_cached_hub_model_loads_offline(offline, empty_hf_cache, checkpoints, monkeypatch):
    snap = _cache_model(empty_hf_cache, "org/tiny", checkpoints["quant"])
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = leanfm.load("org/tiny")
    assert model.leanfm_info["source"] == "hub-cache" and model.leanfm_info["path"] == str(snap)
    assert model.leanfm_info["name"] == "org/tiny" and tok is not None


def test_reachable_hub_downloads_by_id(monkeypatch):
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: True)
    seen = []

    def fake(path, dtype, tokenizer=None):
        seen.append(path)
        raise OSError("org/name is not a valid model identifier listed on 'https://huggingface.co/models'\nmore details")

    monkeypatch.setattr(load_mod, "_from_dir", fake)
    with pytest.raises(LeanfmError) as e:
        leanfm.load("org/name")
    assert seen == ["org/name"]
    assert one_line(e) == ("could not load model 'org/name' from the Hugging Face hub: org/name is not a valid model identifier "
                           "listed on 'https://huggingface.co/models' more details")


def test_hub_probe_against_local_sockets(monkeypatch):
    monkeypatch.undo()  # the real probe
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    assert load_mod.hub_reachable(timeout=2)
    port = srv.getsockname()[1]
    srv.close()  # nobody listens any more: refused at once
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    assert not load_mod.hub_reachable(timeout=2)
    assert time.perf_counter() - t0 < 2.5


def test_hub_endpoint_parsing(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert load_mod._hub_endpoint() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert load_mod._hub_endpoint() == ("hf-mirror.com", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.0.0.2")
    assert load_mod._hub_endpoint() == ("10.0.0.2", 80)


# --- the CLI: one line, exit 2 --------------------------------------------------------------

def _damage(d: Path, what: str) -> None:
    if what == "truncated tensors":
        _truncate(d / "model.safetensors", "in the data")
    elif what == "garbage manifest":
        (d / "leanfm-quant.json").write_text("\x00garbage")
    elif what == "no tokenizer":
        for f in d.glob("tokenizer*"):
            f.unlink()


@pytest.mark.parametrize("what,needle", [
    ("truncated tensors", "model.safetensors is truncated"),
    ("garbage manifest", "leanfm-quant.json is not valid JSON"),
    ("no tokenizer", "no tokenizer in"),
])
def test_cli_eval_of_a_damaged_checkpoint(what, needle, copy_of, tiny_text, tmp_path, capsys):
    d = copy_of("quant")
    _damage(d, what)
    code = cli.main(["eval", "--model", str(d), "--dataset", str(tiny_text), "--metrics", "quality", "--seqlen", "64",
                     "--max-eval-tokens", "128", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("leanfm: error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err and str(d) in err and "internal error" not in err
