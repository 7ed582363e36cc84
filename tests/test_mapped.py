"""Copying weights out of a memory-mapped checkpoint: values kept, ties kept, the mapping's pages
released as each tensor is copied (Linux: read from /proc/self/smaps)."""
from __future__ import annotations

import sys

import pytest
import torch

from leanfm.models.mapped import copy_out_of_mapped_files

from .conftest import tiny_llama

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _mapped_rss(path: str) -> int:
    """Resident bytes of this process's mappings of ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_changed_weights_are_copied_and_their_mapped_pages_released(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_llama(vocab=4096, hidden=256)  # a 4 MB embedding: most of its pages lie wholly inside it
    src.save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # changed in place, as training does: private copies of the mapped pages
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _mapped_rss(path)
    weights = sum(p.nbytes for p in model.parameters())
    assert before >= 0.9 * weights, "the changed weights should be resident in the mapping"

    # a tensor that stays in the mapping (here: an old view) keeps the whole file mapped, as the
    # tensors not yet copied do while the copy goes on: the changed pages must go anyway
    kept = model.model.norm.weight.data
    copied = copy_out_of_mapped_files(model)

    assert copied == weights
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n
    # what is left resident in the mapping: at most the pages a tensor shares with its neighbours
    n_tensors = len(list(model.parameters()))
    assert _mapped_rss(path) <= 2 * 4096 * n_tensors < 0.25 * before
    del kept


def test_tied_weights_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_llama(vocab=512, hidden=64, tie=True)
    src.save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    copy_out_of_mapped_files(model)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert copy_out_of_mapped_files(model) == 0  # nothing is mapped any more
