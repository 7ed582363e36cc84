"""Image-text dual encoders (issue 19 item 4): the contrastive loss, LiT training of the
projections, zero-shot classification, the dual encoder's folder, and `leanfm bench` on tiny
random CLIPModel and dual-encoder folders."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import leanfm
from leanfm.measure.zero_shot import captions, class_embeddings, image_embeddings, zero_shot_accuracy
from leanfm.models.dual_encoder import DualEncoder, DualEncoderConfig, mean_pool
from leanfm.training.lit import contrastive_loss, train_projections

from .conftest import tiny_llama, tiny_tokenizer
from .test_families import fashion_dir  # noqa: F401 - a fixture
from .test_cli import assert_one_line_error, run_cli
from .test_vision import tiny_dinov2


def test_the_loss_is_clips_when_every_label_differs_and_ignores_which_same_class_caption_is_paired():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(contrastive_loss(img, txt, torch.arange(6), scale), clip)
    # two images of class 0 paired with each other's caption: the same loss (both pairs are positives)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    swapped = txt[[1, 0, 2, 3, 4, 5]]
    torch.testing.assert_close(contrastive_loss(img, txt, y, scale), contrastive_loss(img, swapped, y, scale))
    assert contrastive_loss(img, img, torch.arange(6), scale) < contrastive_loss(img, txt, torch.arange(6), scale)


def _synthetic(n_per_class, templates, g, centers, text_map, offsets):
    """Images: class centre + noise; captions: a different linear view of the centre, plus a
    per-template offset (the wording), plus noise."""
    c = centers.shape[0]
    y = torch.arange(c).repeat(n_per_class)
    img = centers[y] + 0.5 * torch.randn(len(y), centers.shape[1], generator=g)
    txt = (centers @ text_map)[:, None, :] + offsets[None, :templates] + 0.1 * torch.randn(c, templates, text_map.shape[1], generator=g)
    return img, y, txt


def test_lit_training_classifies_unseen_images_through_unseen_caption_wordings():
    g = torch.Generator().manual_seed(0)
    centers, text_map = torch.randn(6, 16, generator=g) * 2, torch.randn(16, 24, generator=g)
    offsets = torch.randn(8, 24, generator=g) * 2
    img, y, txt = _synthetic(40, 5, g, centers, text_map, offsets[:5])  # training: templates 0-4
    fit = train_projections(img, txt, y, dim=12, steps=300, batch=64, lr=1e-2, seed=0)
    assert fit["losses"][-1] < 0.5 * fit["losses"][0]
    test_img, test_y, test_txt = _synthetic(20, 3, g, centers, text_map, offsets[5:])  # new images, new wordings
    emb_i = F.normalize(test_img @ fit["visual"].T, dim=-1)
    emb_t = F.normalize(F.normalize(test_txt @ fit["text"].T, dim=-1).mean(1), dim=-1)
    assert zero_shot_accuracy(emb_i, emb_t, test_y) > 0.9
    rand = torch.randn(12, 24, generator=g)  # the same evaluation with an untrained text map: chance-like
    assert zero_shot_accuracy(emb_i, F.normalize((test_txt @ rand.T).mean(1), dim=-1), test_y) < 0.6


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert float(mean_pool(h, torch.tensor([[1, 1, 0]]))) == 2.0


def tiny_dual_encoder(seed=0):
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(projection_dim=16, classes=["red", "green", "blue"], eval_templates=["a {} thing", "{}"])
    return DualEncoder(tiny_dinov2(image=28, patch=4, layers=3, seed=seed), tiny_llama(seed=seed).model, cfg).eval()


def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, eos_token_id=2,
                                      bos_token_id=1, pad_token_id=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        image_size=28, patch_size=4),
                     projection_dim=16)
    return CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-dual")
    tiny_dual_encoder().save_pretrained(d)
    tiny_tokenizer().save_pretrained(str(d / "text_model"))
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip().save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    return d


def test_a_dual_encoder_folder_loads_back_as_a_clip_family_model_with_its_tokenizer(dual_dir):
    ref = tiny_dual_encoder()
    model, tok = leanfm.load(str(dual_dir))
    assert model.leanfm_info["family"] == "clip" and tok is not None
    x = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(x), ref.get_image_features(x))
        torch.testing.assert_close(model.get_text_features(ids, mask), ref.get_text_features(ids, mask))
        # padding does not change a caption's embedding
        torch.testing.assert_close(model.get_text_features(ids[1:, :2], mask[1:, :2]), model.get_text_features(ids, mask)[1:])
    assert json.loads((dual_dir / "config.json").read_text())["model_type"] == "leanfm-dual-encoder"


@pytest.mark.parametrize("make", [tiny_dual_encoder, tiny_clip], ids=["dual-encoder", "CLIPModel"])
def test_zero_shot_embeddings_have_one_unit_vector_per_class_and_image(make):
    model, tok = make(), tiny_tokenizer()
    tok.pad_token = tok.eos_token
    emb = class_embeddings(model, tok, ["red", "green", "blue"], ["a {} thing", "{}"])
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    img = image_embeddings(model, torch.randn(5, 3, 28, 28), batch=2)
    assert img.shape == (5, 16)
    labels = (img @ emb.T).argmax(1)
    assert zero_shot_accuracy(img, emb, labels) == 1.0
    assert captions(["a", "b"], ["x {}", "{} y"]) == ["x a", "a y", "x b", "b y"]


@pytest.mark.parametrize("model_dir", ["dual_dir", "clip_dir"])
def test_bench_measures_zero_shot_accuracy_of_an_image_text_model(model_dir, fashion_dir, tmp_path, capsys, request):  # noqa: F811
    d = request.getfixturevalue(model_dir)
    tome = tmp_path / "tome2.yaml"
    tome.write_text("name: tome2\nseed: 0\nsteps:\n  - {method: tome, r: 2, image_size: 28}\n")
    code, out, err = run_cli(["bench", "--model", str(d), "--data-dir", str(fashion_dir), "--image-size", "28",
                              "--test-per-class", "4", "--repeats", "2", "--threads", "1", "--out", str(tmp_path / "run"),
                              "--recipe", "baseline", "--recipe", str(tome), "--recipe", "rtn-w8-text",
                              "--recipe", "rtn-w8-image"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    leanfm.results.validate(res)
    base, merged, text8, image8 = res["runs"]
    for run in res["runs"]:
        assert 0 <= run["metrics"]["zero_shot_accuracy"] <= 1 and run["metrics"]["images_per_s"] > 0
        assert run["details"]["zero_shot"]["test_images"] == 40 and run["family"] == "clip"
    # the cosine compares image embeddings: the text tower's int8 weights leave them exactly as they were
    assert base["metrics"]["feature_cosine"] == pytest.approx(1.0) and text8["metrics"]["feature_cosine"] == pytest.approx(1.0)
    assert image8["metrics"]["feature_cosine"] < 1 - 1e-7
    # (merging this stand-in data's near-identical background patches is nearly exact: no bound on its cosine)
    assert merged["details"]["steps"][0]["tokens_per_block"] == [50, 48, 46]
    assert "0-shot acc" in out


def test_bench_refuses_a_method_of_another_family_on_an_image_text_model(dual_dir, fashion_dir, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(["bench", "--model", str(dual_dir), "--data-dir", str(fashion_dir), "--image-size", "28",
                            "--out", str(tmp_path / "run"), "--recipe", "gptq-w4"], capsys)
    assert_one_line_error(code, err, "method 'gptq' does not apply to a clip model", "methods for clip models:", "tome")


@pytest.mark.parametrize("model_dir,recipe", [("dual_dir", "rtn-w8-text"), ("dual_dir", "hqq-w4g64-text"),
                                              ("dual_dir", "rtn-w8"), ("clip_dir", "rtn-w8")])
def test_compress_writes_an_image_text_model_that_loads_back_with_its_packed_towers(model_dir, recipe, request, tmp_path,
                                                                                    capsys):
    import leanfm
    from leanfm.kernels.qlinear import QuantLinear

    d = request.getfixturevalue(model_dir)
    code, out, err = run_cli(["compress", "--model", str(d), "--recipe", recipe, "--out", str(tmp_path / "ck"),
                              "--threads", "1"], capsys)
    assert code == 0, err
    ref, tok = leanfm.load(str(d))
    leanfm.apply_(ref, recipe)
    back, tok2 = leanfm.load(str(tmp_path / "ck"))
    assert back.leanfm_info["family"] == "clip" and (tok is None) == (tok2 is None)
    text_packed = any(isinstance(m, QuantLinear) for m in back.text_model.modules())
    image_packed = any(isinstance(m, QuantLinear) for m in back.vision_model.modules())
    assert text_packed and image_packed == (recipe == "rtn-w8")
    x, ids = torch.randn(2, 3, 28, 28), torch.randint(3, 30, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(back.get_image_features(x), ref.get_image_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back.get_text_features(ids, mask), ref.get_text_features(ids, mask), rtol=1e-4, atol=1e-4)
