"""Datasets by name and the seeded calibration sampler."""
import pytest
import torch

from leanfm.data.calib import calibration, sample_windows
from leanfm.data.text import join_lines, load_text
from leanfm.errors import LeanfmError


def test_join_lines_matches_hf_wikitext_layout():
    raw = " \n = Title = \n \n Body text . \n"
    # ["", " = Title = \n", "", " Body text . \n"] joined by "\n\n", as GPTQ does with the HF rows
    assert join_lines(raw) == "\n\n = Title = \n" + "\n\n" + "" + "\n\n" + " Body text . \n"


def test_sample_windows_seeded_and_shaped():
    ids = torch.arange(1000)
    a = sample_windows(ids, 4, 32, seed=0)
    b = sample_windows(ids, 4, 32, seed=0)
    c = sample_windows(ids, 4, 32, seed=1)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 32)) for w in a)  # contiguous slices


def test_calibration_errors():
    with pytest.raises(LeanfmError, match="fewer than one window"):
        sample_windows(torch.arange(10), 2, 32, seed=0)
    with pytest.raises(LeanfmError, match="n >= 1"):
        calibration("gensim-wiki", n=0)


def test_calibration_tokens_from_local_text(tiny_text):
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    cal = calibration(str(tiny_text), n=3, seqlen=16, seed=0)
    t = cal.tokens(tok)
    assert t.shape == (3, 16) and t.dtype == torch.long
    assert torch.equal(t, cal.tokens(tok))


def test_unknown_dataset_name():
    with pytest.raises(LeanfmError, match="unknown dataset 'wikitext3'"):
        load_text("wikitext3")


def test_wikitext_split_validation():
    with pytest.raises(LeanfmError, match="no split 'dev'; its splits are test, valid"):
        load_text("wikitext2", split="dev")


# --- text checks: binary, non-UTF-8 and empty files are refused, naming the file --------------

import importlib.util  # noqa: E402
import os  # noqa: E402

from leanfm.data import text as text_mod  # noqa: E402
from leanfm.data.calib import Calibration  # noqa: E402
from leanfm.data.text import check_dataset  # noqa: E402

BAD_FILES = {
    "random.bin": (os.urandom(4096) + b"\0", "is not a text file (it contains NUL bytes"),
    "random.txt": (bytes(range(256)) * 16, "is not a text file"),
    "utf16.txt": ("hello world, plain words".encode("utf-16"), "is not a text file"),
    "no-nul.txt": (bytes(range(128, 256)) * 32, "is not UTF-8 text"),
    "latin1.txt": ("caf\u00e9 na\u00efve r\u00e9sum\u00e9 ".encode("latin-1") * 50, "is not UTF-8 text"),
    "empty.txt": (b"", "is empty"),
    "blank.txt": (b" \n\n\t \r\n" * 100, "is empty"),
}


@pytest.fixture(params=["check_dataset", "load_text"])
def reader(request):
    return {"check_dataset": check_dataset, "load_text": load_text}[request.param]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_non_text_and_empty_files_are_refused(name, reader, tmp_path):
    data, needle = BAD_FILES[name]
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(LeanfmError) as e:
        reader(str(f))
    msg = str(e.value)
    assert msg.startswith(f"dataset {f} ") and needle in msg and "\n" not in msg, msg
    assert "seqlen" not in msg


def test_blank_first_mib_then_text_is_accepted_and_blank_file_over_a_mib_is_empty(tmp_path):
    f = tmp_path / "late.txt"
    f.write_bytes(b" " * (text_mod._SNIFF_BYTES + 10) + b"words at last")
    check_dataset(str(f))
    assert load_text(str(f)).strip() == "words at last"
    f.write_bytes(b"\n" * (text_mod._SNIFF_BYTES + 10))
    with pytest.raises(LeanfmError, match="is empty"):
        check_dataset(str(f))


def test_binary_after_the_first_mib_is_caught_when_loading(tmp_path):
    f = tmp_path / "tail.txt"
    f.write_bytes(b"a" * (text_mod._SNIFF_BYTES + 10) + b"\0\0")
    check_dataset(str(f))  # cheap: looks at the first MiB only
    with pytest.raises(LeanfmError, match="NUL bytes"):
        load_text(str(f))


def test_a_few_bad_bytes_and_a_bom_are_tolerated(tmp_path):
    f = tmp_path / "mostly.txt"
    f.write_bytes(b"\xef\xbb\xbf" + b"good text " * 500 + b"\xff" + b" more text")
    check_dataset(str(f))
    text = load_text(str(f))
    assert text.startswith("good text") and "\ufffd" in text


def test_any_extension_is_read_when_it_is_text(tmp_path, reader):
    f = tmp_path / "corpus.md"
    f.write_text("# Title\n\nSome words.\n")
    assert reader(str(f)) in (None, "# Title\n\nSome words.\n")


@pytest.mark.parametrize("name,needle", [
    ("missing.txt", "dataset file missing.txt does not exist"),
    ("some/dir/corpus", "dataset file some/dir/corpus does not exist"),
    ("wikitext3", "unknown dataset 'wikitext3'; use one of: wikitext2, gensim-wiki"),
])
def test_missing_or_unknown_names(name, needle, reader):
    with pytest.raises(LeanfmError, match=needle):
        reader(name)


def test_a_folder_is_not_a_dataset(tmp_path, reader):
    with pytest.raises(LeanfmError, match="is a folder, not a text file"):
        reader(str(tmp_path))


def test_split_applies_only_to_wikitext2(tiny_text, reader):
    with pytest.raises(LeanfmError, match="--split valid applies only to wikitext2"):
        reader(str(tiny_text), "valid")
    with pytest.raises(LeanfmError, match="--split train applies only to wikitext2; dataset gensim-wiki"):
        reader("gensim-wiki", "train")


# --- wikitext2: where it is looked for, which splits exist ------------------------------------

@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """No $LEANFM_DATA_DIR, an empty leanfm cache; returns a helper making wikitext-2 folders."""
    monkeypatch.delenv("LEANFM_DATA_DIR", raising=False)
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_mod.importlib.util, "find_spec",
                        lambda name, *a, _real=importlib.util.find_spec: None if name == "datasets" else _real(name, *a))

    def make(where, splits=("test", "valid")):
        d = tmp_path / where
        (d / "wikitext-2").mkdir(parents=True)
        for s in splits:
            (d / "wikitext-2" / f"{s}.txt").write_text(f" = {s} = \n \n words of {s} . \n")
        return d
    return make


def test_wikitext2_found_under_the_default_data_folder(data_env, reader, tmp_path):
    data_env("cache/data")
    got = reader("wikitext2")
    assert got is None or "words of test" in got


def test_wikitext2_search_order(data_env, monkeypatch):
    a, b, c = data_env("a", ["test"]), data_env("b", ["test"]), data_env("cache/data", ["test", "valid"])
    for d in (a, b, c):
        (d / "wikitext-2" / "test.txt").write_text(f"from {d.name}\n")
    monkeypatch.setenv("LEANFM_DATA_DIR", str(b))
    assert "from b" in load_text("wikitext2")  # $LEANFM_DATA_DIR before the default
    assert "from a" in load_text("wikitext2", data_dir_=str(a))  # --data-dir overrides $LEANFM_DATA_DIR
    assert "words of valid" in load_text("wikitext2", "valid", str(a))  # the default is searched after either
    (a / "wikitext-2" / "test.txt").unlink()
    assert "from data" in load_text("wikitext2", data_dir_=str(a))  # not $LEANFM_DATA_DIR's copy: --data-dir overrides it


def test_wikitext2_not_found_names_all_three_places(data_env, reader, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    default = tmp_path / "cache" / "data"
    fix = f"put wikitext-2/test.txt under {default}, or set LEANFM_DATA_DIR, or pass --data-dir"
    with pytest.raises(LeanfmError) as e:
        reader("wikitext2", "test", str(tmp_path / "mine"))
    assert str(e.value) == f"dataset wikitext2 not found: looked for wikitext-2/test.txt in {tmp_path / 'mine'} (--data-dir), {default}; {fix}"
    monkeypatch.setenv("LEANFM_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(LeanfmError) as e:
        reader("wikitext2")
    assert str(e.value) == f"dataset wikitext2 not found: looked for wikitext-2/test.txt in {tmp_path / 'env'} ($LEANFM_DATA_DIR), {default}; {fix}"
    with pytest.raises(LeanfmError, match=r"--data-dir\), .*data \(not \$LEANFM_DATA_DIR=.*env: --data-dir overrides it\)"):
        reader("wikitext2", "test", str(tmp_path / "mine"))


def test_missing_data_dir_is_named(data_env, reader, tmp_path):
    with pytest.raises(LeanfmError, match=f"--data-dir {tmp_path / 'typo'} is not an existing folder"):
        reader("wikitext2", "test", str(tmp_path / "typo"))


@pytest.mark.parametrize("split,result", [
    ("test", "words of test"),
    ("valid", "words of valid"),
    ("validation", "words of valid"),
    ("train", "split 'train' not found: looked for wikitext-2/train.txt in {d} ($LEANFM_DATA_DIR), {default}; "
              "{d}/wikitext-2 has only test.txt, valid.txt: pass --split test or --split valid, or put train.txt there"),
    ("foo", "no split 'foo'; its splits are test, valid (or validation) and train: pass --split test or --split valid; "
            "found locally: test, valid in {d}/wikitext-2"),
    ("Test", "no split 'Test'"),
])
def test_wikitext2_splits(split, result, data_env, reader, tmp_path, monkeypatch):
    d = data_env("shared")
    monkeypatch.setenv("LEANFM_DATA_DIR", str(d))
    result = result.format(d=d, default=tmp_path / "cache" / "data")
    if result.startswith("words"):
        got = reader("wikitext2", split)
        assert got is None or result in got
    else:
        with pytest.raises(LeanfmError) as e:
            reader("wikitext2", split)
        assert result in str(e.value), str(e.value)


def test_wikitext2_empty_split_file(data_env, reader, monkeypatch):
    d = data_env("shared")
    (d / "wikitext-2" / "test.txt").write_text("")
    monkeypatch.setenv("LEANFM_DATA_DIR", str(d))
    with pytest.raises(LeanfmError, match=f"dataset {d / 'wikitext-2' / 'test.txt'} is empty"):
        reader("wikitext2")


def test_datasets_library_is_not_tried_when_the_hub_is_unreachable(data_env, monkeypatch):
    from leanfm.models import load as load_mod

    probes = []
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name, *a: object() if name == "datasets" else None)
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: probes.append(1) or False)
    with pytest.raises(LeanfmError, match="dataset wikitext2 not found"):
        check_dataset("wikitext2")
    assert probes == [1]


# --- gensim-wiki and calibration --------------------------------------------------------------

def test_gensim_wiki_check_needs_gensim_only_without_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path))
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LeanfmError, match="dataset gensim-wiki needs gensim; install it with: pip install gensim"):
        check_dataset("gensim-wiki")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / text_mod._GENSIM_CACHE).write_text("cached article text")
    check_dataset("gensim-wiki")


def test_gensim_wiki_check_with_gensim_installed(tmp_path, monkeypatch):
    pytest.importorskip("gensim")
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path))
    check_dataset("gensim-wiki")  # finds the packaged sample without cleaning it


def test_calibration_check_names_its_flag(tmp_path):
    with pytest.raises(LeanfmError, match="unknown dataset 'wikitxt' for --calib-dataset"):
        calibration("wikitxt", n=2, seqlen=16).check()
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(LeanfmError, match=f"dataset {empty} is empty"):
        calibration(str(empty), n=2, seqlen=16).check()
    assert isinstance(calibration(str(empty), n=2, seqlen=16), Calibration)  # building it reads nothing


def test_calibration_of_an_empty_file_says_empty_not_seqlen(tmp_path):
    from tests.conftest import tiny_tokenizer

    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(LeanfmError) as e:
        calibration(str(empty), n=2, seqlen=16).tokens(tiny_tokenizer())
    assert "is empty" in str(e.value) and "seqlen" not in str(e.value)


def test_short_calibration_text_states_its_token_count(tmp_path):
    from tests.conftest import tiny_tokenizer

    short = tmp_path / "s.txt"
    short.write_text("The quick brown fox")
    with pytest.raises(LeanfmError, match=r"calibration corpus .*s.txt has only \d+ tokens, fewer than one window of 64"):
        calibration(str(short), n=2, seqlen=64).tokens(tiny_tokenizer())


@pytest.mark.parametrize("kw,needle", [
    ({"n": 2.5}, "calibration n must be a whole number"),
    ({"seqlen": "64"}, "calibration seqlen must be a whole number"),
    ({"n": True}, "calibration n must be a whole number"),
    ({"dataset": 3}, "calibration dataset must be a name"),
])
def test_calibration_argument_types(kw, needle):
    with pytest.raises(LeanfmError, match=needle):
        calibration(**{"dataset": "gensim-wiki", "n": 2, "seqlen": 16, **kw})


# --- the CLI refuses bad evaluation data before loading the model -----------------------------

@pytest.mark.parametrize("content,needle", [
    (os.urandom(2048) + b"\0", "is not a text file"),
    (b"", "is empty"),
])
def test_cli_eval_refuses_bad_data_before_loading(content, needle, tmp_path, capsys, monkeypatch):
    from leanfm import bench, cli

    monkeypatch.setattr(bench, "load", lambda *a, **k: pytest.fail("the data must be checked first"), raising=False)
    f = tmp_path / "data.bin"
    f.write_bytes(content)
    code = cli.main(["eval", "--model", "no/such-model-needed", "--dataset", str(f), "--metrics", "quality", "--seqlen", "64",
                     "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"leanfm: error: dataset {f} ") and needle in err and len(err.splitlines()) == 1, err


def test_encode_in_pieces_gives_the_ids_of_the_whole_text():
    from leanfm.data.calib import encode
    from tests.conftest import SAMPLE_TEXT, tiny_tokenizer

    tok = tiny_tokenizer()
    text = SAMPLE_TEXT.replace(". ", ".\n\n  ") * 3  # newlines and runs of spaces at the cuts
    whole = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    for chunk in (37, 100, 1000, len(text) + 1):
        assert torch.equal(encode(tok, text, chunk_chars=chunk), whole), chunk


def test_encode_falls_back_to_the_whole_text_when_pieces_differ():
    """A tokenizer that marks the start of every call (as sentencepiece's prefix space does)
    would change the ids at each cut: encode must notice and tokenize the text at once."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from leanfm.data.calib import encode

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<", "a", "b", "c"])}, unk_token="<unk>"))
    tk.normalizer = normalizers.Prepend("<")  # one "<" id at the start of every call
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    text = "a b c " * 50
    whole = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert torch.equal(encode(tok, text, chunk_chars=20), whole)
