"""Quality of an image encoder's features: k-NN and linear-probe accuracy, and fidelity.

The protocols self-supervised ViTs are judged by (DINO: Caron et al., 2021, § 4.1; DINOv2:
Oquab et al., 2023, § 7): features of a frozen encoder, classified without fine-tuning it.

- :func:`knn_accuracy`: weighted k-NN on L2-normalised features. Each of the ``k`` nearest
  training features (cosine) votes for its class with weight ``exp(sim / T)`` (DINO's choice,
  k = 20, T = 0.07).
- :func:`linear_probe_accuracy`: a multinomial logistic regression on standardised features
  (full-batch L-BFGS, L2 penalty, seeded), the accuracy on the test features.
- :func:`fidelity`: mean cosine between a compressed encoder's features and the original's on the
  same images: 1.0 is an exact copy, independent of any label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode(model, pixels: torch.Tensor, batch: int = 32, advance=None) -> torch.Tensor:
    """Class-token features ``[N, D]`` (the final LayerNorm's first token) of ``pixels [N, 3, H, W]``;
    ``advance(n)`` is called after each batch of ``n`` images (a progress bar)."""
    out = []
    for i in range(0, pixels.shape[0], batch):
        out.append(model(pixel_values=pixels[i:i + batch]).last_hidden_state[:, 0])
        if advance is not None:
            advance(out[-1].shape[0])
    return torch.cat(out)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy (DINO's protocol) of ``test_f`` against ``train_f``."""
    a, b = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k = min(k, a.shape[0])
    sim, idx = (b @ a.T).topk(k, dim=1)
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(b.shape[0], n_cls).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def linear_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                          weight_decay: float = 1e-3, steps: int = 100, seed: int = 0) -> float:
    """Accuracy of a logistic regression fitted on the (standardised) training features."""
    mu, sd = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    xa, xb = (train_f - mu) / sd, (test_f - mu) / sd
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(xa.shape[1], n_cls, generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xa @ w + b, train_y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xb @ w + b).argmax(1) == test_y).float().mean())


def fidelity(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows (1.0: identical directions)."""
    return float(F.cosine_similarity(features.float(), reference.float(), dim=1).mean())
