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
    with pytest.raises(LeanfmError, match="splits test, valid"):
        load_text("wikitext2", split="dev")
