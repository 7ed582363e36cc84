"""Image datasets for the vision models: Fashion-MNIST, read from its IDX files.

``fashion-mnist`` (Xiao et al., 2017: 60,000 train and 10,000 test 28 × 28 grey images of 10
clothing classes) is read from ``<folder>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``,
the first folder that has it of: the user's folder (``--data-dir`` / ``$LEANFM_DATA_DIR``), the
default ``<leanfm cache>/data``, and Debian's ``/usr/share/datasets`` (``apt-get install
dataset-fashion-mnist``, which ``make test`` runs).

:func:`fixed_split` draws a class-balanced subset with a seed, so every run of a protocol sees
the same images; :func:`to_pixels` turns grey 28 × 28 images into what an ImageNet-trained ViT
reads (3 channels, bilinear resize, ImageNet mean/std).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

from ..errors import LeanfmError
from .text import data_dirs

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SYSTEM_DIR = Path("/usr/share/datasets")
INSTALL = "apt-get install dataset-fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(data_dir: str | os.PathLike | None) -> Path:
    tried = []
    for d, how in data_dirs(data_dir) + [(SYSTEM_DIR, "Debian")]:
        f = d / "fashion-mnist"
        if all((f / name).is_file() for names in _FILES.values() for name in names):
            return f
        tried.append(str(f))
    raise LeanfmError(f"Fashion-MNIST not found (looked in {', '.join(tried)}); install it with: {INSTALL}")


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file (LeCun's MNIST format: big-endian magic 0x0000080N, N sizes, uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    if magic != 0x0800 | ndim:
        raise LeanfmError(f"{path} is not an IDX file of {ndim} dimension(s) (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(torch.tensor(dims).prod()):
        raise LeanfmError(f"{path} is truncated: {len(body)} bytes for sizes {dims}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` (train | test)."""
    if split not in _FILES:
        raise LeanfmError(f"Fashion-MNIST has splits train and test, not '{split}'")
    folder = _folder(data_dir)
    images, labels = (_read_idx(folder / name, nd) for name, nd in zip(_FILES[split], (3, 1)))
    if images.shape[0] != labels.shape[0]:
        raise LeanfmError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.long()


def fixed_split(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` examples of every class, drawn with ``seed`` (sorted)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise LeanfmError(f"class {c} has {len(idx)} examples, fewer than the {per_class} asked for")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def to_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 ``[N, H, W]`` grey images -> fp32 ``[N, 3, size, size]``, ImageNet-normalised (bilinear resize)."""
    x = images.float().div(255).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def calibration_images(per_class: int = 8, size: int = 224, seed: int = 0,
                       data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Pixels ``[10 * per_class, 3, size, size]`` for the calibrated methods on a ViT (GPTQ, Wanda,
    SparseGPT): a class-balanced draw from the Fashion-MNIST *train* file with its own seed
    (``seed + 1000``), never the test images the quality protocol scores."""
    images, labels = load_fashion_mnist("train", data_dir)
    return to_pixels(images[fixed_split(labels, per_class, seed=seed + 1000)], size)

