"""Zero-shot classification with an image-text dual encoder (CLIP's protocol, Radford et al., 2021, § 3.1.4).

Every class is described by captions built from prompt templates ("a photo of a {}."); the
class's text embedding is the mean of its captions' normalised embeddings (CLIP's prompt
ensembling, § 3.1.4), renormalised. An image is assigned the class whose text embedding has the
highest cosine with the image's embedding. No classifier is fitted on the images: the labels are
used only to score the answer.

Works on any model with ``get_image_features(pixel_values)`` and
``get_text_features(input_ids, attention_mask)``: transformers' ``CLIPModel`` or leanfm's
``DualEncoder``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Caption templates for Fashion-MNIST's classes when a model brings none of its own.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                     "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
# The classes in words a caption can use (Fashion-MNIST's label order, data/images.py CLASSES).
CLASS_WORDS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")


def _as_tensor(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (older transformers, leanfm) or a model output."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"cannot read embeddings from {type(out).__name__}")


@torch.no_grad()
def image_embeddings(model, pixels: torch.Tensor, batch: int = 32, advance=None) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]``; ``advance(n)`` after each batch (a progress bar)."""
    out = []
    for i in range(0, pixels.shape[0], batch):
        out.append(F.normalize(_as_tensor(model.get_image_features(pixel_values=pixels[i:i + batch])).float(), dim=-1))
        if advance is not None:
            advance(out[-1].shape[0])
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """L2-normalised text embeddings ``[len(texts), D]`` (padded batches, the mask passed on)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i:i + batch]), return_tensors="pt", padding=True)
        feats = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out.append(F.normalize(_as_tensor(feats).float(), dim=-1))
    return torch.cat(out)


def captions(classes, templates) -> list[str]:
    """Every template filled with every class, class-major: ``[c0 t0, c0 t1, ..., c1 t0, ...]``."""
    return [t.format(c) for c in classes for t in templates]


def class_embeddings(model, tokenizer, classes, templates) -> torch.Tensor:
    """One normalised text embedding per class: the mean over its captions (prompt ensembling)."""
    e = text_embeddings(model, tokenizer, captions(classes, templates))
    return F.normalize(e.view(len(classes), len(templates), -1).mean(1), dim=-1)


def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """The class of highest cosine for each (normalised) image embedding."""
    return (image_emb @ class_emb.T).argmax(dim=1)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    return float((zero_shot_predict(image_emb, class_emb) == labels).float().mean())
