"""Vision pieces of issue 19: ToMe's math and its DINOv2 glue, Fashion-MNIST, feature-quality metrics."""
from __future__ import annotations

import gzip
import struct

import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.measure.vision import fidelity, knn_accuracy, linear_probe_accuracy
from leanfm.methods.vision.tome import (apply_tome, bipartite_soft_matching, max_r, merge_by_size,
                                        proportional_attention)


def tiny_dinov2(image=28, patch=4, layers=3, seed=0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, mlp_ratio=2, patch_size=patch,
                       image_size=image, layerscale_value=1.0)
    return Dinov2Model(cfg).eval()


def test_bipartite_matching_merges_the_most_similar_pairs_and_keeps_the_class_token_first():
    # tokens 0..7 (A: even, B: odd); token 2 equals token 5 and token 4 equals token 7: those two
    # edges are the most similar, so r=2 merges 2 into 5 and 4 into 7
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6)
    x[0, 2], x[0, 4] = x[0, 5], x[0, 7]
    merge = bipartite_soft_matching(x, 2)
    size = torch.ones(1, 8, 1)
    y, s = merge_by_size(merge, x, size)
    assert y.shape == (1, 6, 6) and s.sum() == 8
    torch.testing.assert_close(y[0, 0], x[0, 0])  # the class token is first and untouched
    kept_a = y[0, :2]  # A tokens not merged: 0 and 6, in order
    torch.testing.assert_close(kept_a, x[0, [0, 6]])
    assert s[0, :, 0].tolist() == [1, 1, 1, 1, 2, 2]  # kept A (0, 6), then B (1, 3, 5, 7): 5 and 7 absorbed one each
    torch.testing.assert_close(y[0, 4], x[0, 5])  # merging equal tokens averages to the same token


def test_size_weighted_merging_is_the_mean_of_the_patches_a_token_stands_for():
    x = torch.tensor([[[0.0], [1.0], [5.0], [3.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # token 2 matches token 1
    y, s = merge_by_size(bipartite_soft_matching(metric, 1), x, size)
    assert s[0, :, 0].tolist() == [1, 4, 1]
    torch.testing.assert_close(y[0, 1, 0], torch.tensor((1.0 * 3 + 5.0) / 4))


def test_proportional_attention_equals_attending_to_duplicated_keys():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    size = torch.tensor([[[1.0], [2.0], [1.0]]])
    got = proportional_attention(q, k, v, size, 0.5)
    k2, v2 = torch.cat([k, k[:, :, 1:2]], 2), torch.cat([v, v[:, :, 1:2]], 2)  # key 1 twice
    ref = torch.softmax(q @ k2.transpose(-1, -2) * 0.5, -1) @ v2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_tome_with_r0_is_the_original_model_and_r_shrinks_the_tokens():
    model = tiny_dinov2()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        apply_tome(model, 0)
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        apply_tome(model, 5)
        out = model(pixel_values=x).last_hidden_state
        assert out.shape == (2, 50 - 3 * 5, 32)
        assert float(model.leanfm_tome.size.sum()) == 2 * 50  # every patch is still counted once
        again = model(pixel_values=x).last_hidden_state  # sizes reset between forwards
    torch.testing.assert_close(again, out)


def test_tome_refuses_an_r_larger_than_the_tokens_left_and_a_size_the_patch_does_not_divide():
    assert max_r(50, 3) == 12  # 50 -> 38 -> 26 tokens; a block of 26 can merge at most 12
    apply_tome(tiny_dinov2(), 12)
    with pytest.raises(LeanfmError, match=r"ToMe r=13 merges more tokens than block 2 has left \(24 of 50 .*use r <= 12"):
        apply_tome(tiny_dinov2(), 13)
    with pytest.raises(LeanfmError, match="image size 30 is not a multiple of the patch size 4; use 28 or 32"):
        apply_tome(tiny_dinov2(), 1, image_size=30)
    with pytest.raises(LeanfmError, match="applies to DINOv2 and CLIP"):
        apply_tome(torch.nn.Linear(2, 2), 1)


def test_knn_linear_probe_and_fidelity_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 5
    y_tr, y_te = torch.arange(3).repeat(20), torch.arange(3).repeat(10)
    f_tr = centers[y_tr] + torch.randn(60, 8, generator=g)
    f_te = centers[y_te] + torch.randn(30, 8, generator=g)
    assert knn_accuracy(f_tr, y_tr, f_te, y_te) == 1.0
    assert linear_probe_accuracy(f_tr, y_tr, f_te, y_te) == 1.0
    assert knn_accuracy(f_tr, y_tr[torch.randperm(60, generator=g)], f_te, y_te) < 0.7  # labels shuffled: chance-like
    assert fidelity(f_te, f_te) == pytest.approx(1.0) and fidelity(f_te, -f_te) == pytest.approx(-1.0)


def _idx(path, arr: torch.Tensor):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | arr.dim()) + struct.pack(">" + "I" * arr.dim(), *arr.shape) + arr.numpy().tobytes())


def test_fashion_mnist_reads_idx_files_and_draws_a_fixed_balanced_split(tmp_path, monkeypatch):
    from leanfm.data import images

    d = tmp_path / "fashion-mnist"
    d.mkdir()
    imgs, labels = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8), torch.arange(10).repeat(4).to(torch.uint8)
    for split, n in (("train", 40), ("test", 20)):
        _idx(d / images._FILES[split][0], imgs[:n])
        _idx(d / images._FILES[split][1], labels[:n])
    monkeypatch.setenv("LEANFM_DATA_DIR", str(tmp_path))
    x, y = images.load_fashion_mnist("train")
    assert torch.equal(x, imgs) and y.dtype == torch.long and torch.equal(y, labels.long())
    pick = images.fixed_split(y, 3, seed=1)
    assert torch.equal(pick, images.fixed_split(y, 3, seed=1)) and len(pick) == 30
    assert torch.bincount(y[pick]).tolist() == [3] * 10
    px = images.to_pixels(x[:2], 56)
    assert px.shape == (2, 3, 56, 56) and px.dtype == torch.float32
    with pytest.raises(LeanfmError, match="splits train and test"):
        images.load_fashion_mnist("valid")
    monkeypatch.setenv("LEANFM_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(images, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("LEANFM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LeanfmError, match="install it with: apt-get install dataset-fashion-mnist"):
        images.load_fashion_mnist("train")


def test_evit_keeps_the_most_attended_patches_in_order_and_fuses_the_rest():
    from leanfm.methods.vision.prune_tokens import select_tokens

    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, 2)  # token i has features (i, i)
    attn = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])  # patches 1..5
    out = select_tokens(x, attn, keep_rate=0.4)  # keep ceil(0.4 * 5) = 2: patches 2 and 4, in order
    assert out[0, :3, 0].tolist() == [0.0, 2.0, 4.0]
    fused = (1 * 0.1 + 3 * 0.05 + 5 * 0.15) / 0.3  # the others, weighted by their attention
    assert out.shape == (1, 4, 2) and float(out[0, 3, 0]) == pytest.approx(fused)
    assert select_tokens(x, attn, keep_rate=0.4, fuse=False).shape == (1, 3, 2)
    assert torch.equal(select_tokens(x, attn, keep_rate=1.0), x)


def test_token_prune_runs_the_schedule_it_declares_and_keeping_everything_is_the_plain_model():
    from leanfm.methods.vision.decl import TokenPruneConfig, prune_schedule
    from leanfm.methods.vision.prune_tokens import apply_token_prune

    x = torch.randn(2, 3, 28, 28)
    model = tiny_dinov2()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        apply_token_prune(model, TokenPruneConfig(keep_rate=1.0, layers=(0, 1), image_size=28))
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        cfg = TokenPruneConfig(keep_rate=0.5, layers=(0, 1), image_size=28)
        pruned = apply_token_prune(tiny_dinov2(), cfg)
        out = pruned(pixel_values=x).last_hidden_state
    # 49 patches -> 25 kept + 1 fused -> 13 kept + 1 fused: the class token and 14 more
    assert prune_schedule(50, 3, 0.5, (0, 1)) == [50, 27, 15] == cfg.token_schedule(50, 3)
    assert out.shape == (2, 15, 32)
    with pytest.raises(LeanfmError, match=r"token-prune layers \[5\] do not exist: the model has 3 blocks"):
        apply_token_prune(tiny_dinov2(), TokenPruneConfig(layers=(1, 5), image_size=28))
    with pytest.raises(LeanfmError, match="keep_rate=0 must be in"):
        TokenPruneConfig(keep_rate=0).validate()
    with pytest.raises(LeanfmError, match="tome and token-prune cannot be combined"):
        apply_tome(pruned, 2, image_size=28)
