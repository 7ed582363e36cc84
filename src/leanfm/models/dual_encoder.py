"""An image-text dual encoder assembled from two separately trained towers (family ``clip``).

CLIP (Radford et al., 2021) trains an image and a text encoder together so that an image and its
caption land close in one embedding space; LiT (Zhai et al., CVPR 2022, "LiT: Zero-Shot Transfer
with Locked-image text Tuning") keeps a pretrained image tower *locked* and trains only what maps
the text into its space. :class:`DualEncoder` is the smallest version of that: two frozen towers
and two linear projections into a shared space, the only weights trained (``training/lit.py``).

- image embedding: the vision tower's class token after its final LayerNorm (DINOv2's
  ``last_hidden_state[:, 0]``), times ``visual_projection``;
- text embedding: the text tower's last hidden states averaged over the caption's tokens (a
  decoder-only LM has no pooled output), times ``text_projection``;
- similarity: cosine of the two, scaled by ``exp(logit_scale)``.

It has ``get_image_features`` / ``get_text_features`` like transformers' ``CLIPModel``, so the
zero-shot protocol (``measure/zero_shot.py``) runs on either. Saved as a folder: ``config.json``
(``model_type: leanfm-dual-encoder``, the projection size, the prompts it was trained and is
evaluated with), ``vision_model/`` and ``text_model/`` (plain Hugging Face folders any
``AutoModel`` loads, or leanfm's packed format for a tower ``leanfm compress`` quantized; the
tokenizer is in ``text_model/``), and ``projections.safetensors``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError

MODEL_TYPE = "leanfm-dual-encoder"
PROJECTIONS = "projections.safetensors"
PACKED_PROJECTIONS = "projections.quant.json"  # manifest entries of projections a method packed


class DualEncoderConfig:
    """What :class:`DualEncoder` needs besides its towers' own configs (JSON in ``config.json``)."""

    model_type = MODEL_TYPE

    def __init__(self, projection_dim: int = 256, classes: list | None = None, train_templates: list | None = None,
                 eval_templates: list | None = None, assembly: dict | None = None, **_):
        self.projection_dim = int(projection_dim)
        self.classes = list(classes or [])
        self.train_templates = list(train_templates or [])
        self.eval_templates = list(eval_templates or [])
        self.assembly = dict(assembly or {})  # how it was built: towers, data, training (the report says it)

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2))

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["DualEncoder"], "projection_dim": self.projection_dim,
                "classes": self.classes, "train_templates": self.train_templates,
                "eval_templates": self.eval_templates, "assembly": self.assembly}


class DualEncoder(nn.Module):
    """Image tower + text tower + two linear projections into one space (see the module doc)."""

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        self.vision_model, self.text_model = vision_model, text_model
        v_dim = vision_model.config.hidden_size
        t_dim = text_model.config.hidden_size
        self.visual_projection = nn.Linear(v_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(t_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 0])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(mean_pool(h, attention_mask))

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Image embeddings for ``pixel_values``, text embeddings for ``input_ids``, or both as a
        pair ``(image, text)`` when both are given."""
        if pixel_values is None and input_ids is None:
            raise LeanfmError("the dual encoder needs pixel_values (images) or input_ids (captions)")
        image = None if pixel_values is None else self.get_image_features(pixel_values)
        text = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
        return image if text is None else text if image is None else (image, text)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from ..kernels.checkpoint import module_tensors

        _save_tower(self.vision_model, folder / "vision_model")
        _save_tower(self.text_model, folder / "text_model")
        # the projections as they are: fp32 weights, or a packed layer's codes and scales (with
        # their manifest entries beside them) when a method quantized them too
        heads = nn.ModuleDict({"visual_projection": self.visual_projection, "text_projection": self.text_projection})
        tensors, packed = module_tensors(heads)
        save_file({**tensors, "logit_scale": self.logit_scale.detach().reshape(1)}, str(folder / PROJECTIONS))
        if packed:
            (folder / PACKED_PROJECTIONS).write_text(json.dumps(packed, indent=1))
        self.config.save_pretrained(folder)


def _save_tower(tower: nn.Module, dest: Path) -> None:
    """A tower as a plain Hugging Face folder, or in leanfm's packed format when a method left
    packed int layers in it (``load_dual_encoder`` reads either)."""
    from ..kernels.checkpoint import quantized_layers, save_quantized

    if quantized_layers(tower):
        save_quantized(tower, dest)
    else:
        tower.save_pretrained(str(dest))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden [B, T, D]`` over the positions where ``mask [B, T]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def tokenizer_folder(folder: str | Path) -> Path:
    """Where a dual encoder folder keeps its text tokenizer."""
    return Path(folder) / "text_model"


def is_dual_encoder(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def load_dual_encoder(folder: str | Path, dtype: torch.dtype = torch.float32) -> DualEncoder:
    """The :class:`DualEncoder` saved in ``folder``; a one-line error names a missing part."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for part in ("vision_model", "text_model", PROJECTIONS):
        if not (folder / part).exists():
            raise LeanfmError(f"dual encoder {folder} has no {part}; rebuild it (delete the folder and load it again)")
    from .checkpoint import load_checkpoint

    cfg = DualEncoderConfig(**json.loads((folder / "config.json").read_text()))
    vision = load_checkpoint(folder / "vision_model", dtype, family="vit")  # plain or packed (compressed) towers
    text = load_checkpoint(folder / "text_model", dtype, family="clip")
    model = DualEncoder(vision, text, cfg)
    sd = load_file(str(folder / PROJECTIONS))
    packed = json.loads((folder / PACKED_PROJECTIONS).read_text()) if (folder / PACKED_PROJECTIONS).is_file() else {}
    try:
        with torch.no_grad():
            for name in ("visual_projection", "text_projection"):
                if name in packed:
                    from ..kernels.checkpoint import rebuild_linear

                    setattr(model, name, rebuild_linear(name, packed[name], sd.__getitem__, sd.__contains__,
                                                        tuple(getattr(model, name).weight.shape)))
                else:
                    getattr(model, name).weight.copy_(sd[f"{name}.weight"])
            model.logit_scale.copy_(sd["logit_scale"][0])
    except (KeyError, ValueError, RuntimeError) as e:
        raise LeanfmError(f"{folder / PROJECTIONS} does not hold this model's projections ({' '.join(str(e).split())[:120]}); "
                          "rebuild it (delete the folder and load it again)") from None
    # the towers are loaded in ``dtype`` already; converting the whole model would also cast a
    # packed tower's kernel buffers (bf16 scales of the int8 kernel) to ``dtype``
    for part in (model.visual_projection, model.text_projection):
        if isinstance(part, nn.Linear):
            part.to(dtype)
    model.logit_scale.data = model.logit_scale.data.to(dtype)
    return model.eval()
