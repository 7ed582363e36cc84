"""LiT-style locked-tower tuning (Zhai et al., CVPR 2022) of the ``lit-fmnist`` dual encoder.

How the model is assembled (the report repeats this):

- **image tower**: DINOv2 ViT-S/14 (``dinov2-s``), locked; its class token at 224x224.
- **text tower**: SmolLM2-135M's decoder (``smollm2-135m`` without its LM head), locked; its
  last hidden states averaged over the caption's tokens.
- **trained**: only two linear maps into a 256-wide shared space and the temperature, with
  CLIP's symmetric contrastive loss (Radford et al., 2021, Fig. 3) on Fashion-MNIST *training*
  images (``per_class`` per class, seeded) paired with captions of their class made from the
  *training* templates. Images of one class share their captions, so every same-class pair in a
  batch counts as a positive: the target of each row is uniform over those pairs (rather than
  the one diagonal entry, which would push apart captions that describe the image equally well).
- **evaluated** (``measure/zero_shot.py``) on Fashion-MNIST *test* images with a disjoint set of
  *evaluation* templates: neither the images nor the prompt wordings were seen in training.
  The ten class names were: this is zero-shot in CLIP's sense (classes named in words, no
  classifier fitted on image features), not transfer to unseen classes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import progress
from ..errors import LeanfmError

TRAIN_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a cropped photo of a {}.", "a bright photo of a {}.",
                   "a dark photo of a {}.", "a photo of a small {}.", "a photo of a large {}.", "a grayscale photo of a {}.",
                   "a blurry photo of a {}.", "a product photo of a {}.")
EVAL_TEMPLATES = ("a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.", "a low resolution photo of a {}.",
                  "a black and white photo of a {}.", "itap of a {}.")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the ``[B, B]`` cosine logits of ``image`` and ``text``
    embeddings (row i: image i and its caption), with every same-class pair a positive: the target
    of each row and column is uniform over the pairs whose labels match."""
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp() * i @ t.T
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_projections(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor, dim: int = 256,
                      steps: int = 600, batch: int = 256, lr: float = 1e-3, seed: int = 0, advance=None) -> dict:
    """Fit the two projections on locked features: ``image_feats [N, Dv]`` with ``labels [N]``, and
    ``text_feats [C, T, Dt]`` (class c's caption from template t). Each step draws ``batch`` images
    and one training caption of each image's class. Returns the weights (``visual [dim, Dv]``,
    ``text [dim, Dt]``, ``logit_scale``) and the loss curve."""
    if image_feats.shape[0] != labels.shape[0]:
        raise LeanfmError(f"{image_feats.shape[0]} image features but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    wv = torch.nn.Linear(image_feats.shape[1], dim, bias=False)
    wt = torch.nn.Linear(text_feats.shape[2], dim, bias=False)
    for w in (wv, wt):
        torch.nn.init.normal_(w.weight, std=w.in_features ** -0.5, generator=g)
    scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())
    opt = torch.optim.AdamW([wv.weight, wt.weight, scale], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n, n_t = image_feats.shape[0], text_feats.shape[1]
    losses = []
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=g)
        y = labels[idx]
        tmpl = torch.randint(n_t, (idx.shape[0],), generator=g)
        loss = contrastive_loss(wv(image_feats[idx]), wt(text_feats[y, tmpl]), y, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            scale.clamp_(0, 4.6052)  # CLIP caps the scale at 100
        losses.append(float(loss.detach()))
        if advance is not None:
            advance(1)
    return {"visual": wv.weight.detach(), "text": wt.weight.detach(), "logit_scale": scale.detach(), "losses": losses}


@torch.no_grad()
def caption_features(text_model, tokenizer, classes, templates) -> torch.Tensor:
    """Mean-pooled hidden states ``[C, T, D]`` of the locked text tower for every class and template."""
    from ..measure.zero_shot import captions
    from ..models.dual_encoder import mean_pool

    enc = tokenizer(captions(classes, templates), return_tensors="pt", padding=True)
    h = text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return mean_pool(h, enc["attention_mask"]).view(len(classes), len(templates), -1)


def build_lit(folder: str | Path, per_class: int = 200, seed: int = 0, dim: int = 256, steps: int = 600,
              image_size: int = 224, data_dir=None) -> dict:
    """Assemble and train the ``lit-fmnist`` dual encoder into ``folder`` (the alias's builder);
    returns what the cache records about its source."""
    from ..api import load
    from ..data.images import fixed_split, load_fashion_mnist, to_pixels
    from ..measure.vision import encode
    from ..measure.zero_shot import CLASS_WORDS
    from ..models.dual_encoder import DualEncoder, DualEncoderConfig, tokenizer_folder

    t0 = time.perf_counter()
    vision, _ = load("dinov2-s")
    lm, tok = load("smollm2-135m")
    text = lm.model
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    images, labels = load_fashion_mnist("train", data_dir)
    idx = fixed_split(labels, per_class, seed)
    pixels, y = to_pixels(images[idx], image_size), labels[idx]
    progress.info(f"building lit-fmnist (once): locked features of {len(idx)} Fashion-MNIST training images, "
                  "then the projections")
    with progress.bar("lit-fmnist: image tower features", len(idx)) as adv:
        img = encode(vision, pixels, advance=adv)
    txt = caption_features(text, tok, CLASS_WORDS, TRAIN_TEMPLATES)
    with progress.bar("lit-fmnist: contrastive training of the projections", steps) as adv:
        fit = train_projections(img, txt, y, dim=dim, steps=steps, seed=seed, advance=adv)
    cfg = DualEncoderConfig(projection_dim=dim, classes=list(CLASS_WORDS), train_templates=list(TRAIN_TEMPLATES),
                            eval_templates=list(EVAL_TEMPLATES), assembly={
                                "image_tower": "dinov2-s (locked): class token after the final LayerNorm",
                                "text_tower": "smollm2-135m decoder without its LM head (locked): mean of the last hidden "
                                              "states over the caption's tokens",
                                "trained": f"two linear projections to {dim} dims and the temperature; CLIP's symmetric "
                                           "contrastive loss, same-class pairs positive",
                                "data": f"Fashion-MNIST train, {per_class} images per class (seed {seed}) at {image_size}x"
                                        f"{image_size}, captions from {len(TRAIN_TEMPLATES)} training templates",
                                "steps": steps, "final_loss": round(sum(fit["losses"][-20:]) / 20, 4),
                                "build_seconds": None,
                            })
    model = DualEncoder(vision, text, cfg)
    with torch.no_grad():
        model.visual_projection.weight.copy_(fit["visual"])
        model.text_projection.weight.copy_(fit["text"])
        model.logit_scale.copy_(fit["logit_scale"])
    cfg.assembly["build_seconds"] = round(time.perf_counter() - t0, 1)
    model.save_pretrained(folder)
    tok.save_pretrained(str(tokenizer_folder(folder)))
    return {"built_from": ["dinov2-s", "smollm2-135m", "fashion-mnist train"], "assembly": cfg.assembly}
