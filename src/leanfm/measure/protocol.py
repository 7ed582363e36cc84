"""The fixed, documented measurement settings shared by ``measure`` and ``bench``."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import LeanfmError

GROUPS = ("quality", "speed", "memory", "energy")


def check_threads(threads: int) -> None:
    """More torch threads than cores only makes OpenMP threads wait on each other: refuse it."""
    cores = os.cpu_count() or 1
    if threads > cores:
        raise LeanfmError(f"--threads {threads} exceeds the {cores} CPU cores of this machine; use at most {cores}")


@dataclass
class Protocol:
    """Measurement settings; the defaults are the documented protocol (docs/results-schema.md).

    quality: ``seqlen`` tokens per window (BOS included where the model needs it), at most
    ``max_eval_tokens`` text tokens (None = the whole split); fidelity to the baseline
    (top-1 agreement, KL) on the first windows covering ``max_fidelity_tokens`` (None = all). speed: batch ``batch``, a prompt of
    ``prompt`` tokens, ``gen`` greedy decode steps with the KV cache, ``warmup`` unrecorded
    repeats then ``repeats`` recorded ones, on ``threads`` torch threads. A vision model
    (family ``vit``, :mod:`leanfm.bench_vision`): ``image_size`` pixels per side,
    ``train_per_class`` and ``test_per_class`` Fashion-MNIST images per class. A diffusion
    model (family ``diffusion``, :mod:`leanfm.bench_diffusion`): ``samples`` seeds (0..N-1)
    sampled with ``steps`` denoising steps unless a recipe sets its own.
    """

    dataset: str = "wikitext2"
    split: str = "test"
    data_dir: str | None = None
    seqlen: int = 2048
    max_eval_tokens: int | None = None
    max_fidelity_tokens: int | None = None
    batch: int = 1
    prompt: int = 128
    gen: int = 32
    repeats: int = 10
    warmup: int = 1
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # 2, or fewer cores where fewer exist
    groups: tuple[str, ...] = GROUPS
    device: str = "cpu"  # torch runtime: cpu | cuda (leanfm.models.device)
    dtype: str = "fp32"  # torch runtime: fp32 | bf16 | fp16
    compile: bool = False  # torch runtime: decode on a static KV cache with a compiled step (models/compiled.py)
    image_size: int = 224  # vision models: square input side in pixels
    train_per_class: int = 50  # vision models: Fashion-MNIST images per class the k-NN / probe learn from
    test_per_class: int = 20  # vision models: images per class they are scored (and timed) on
    steps: int = 4  # diffusion models: denoising steps per sample (a recipe's sampling-steps overrides it)
    samples: int = 32  # diffusion models: samples (seeds 0..N-1) compared and timed

    def validate(self) -> None:
        if isinstance(self.groups, str) or not all(isinstance(g, str) for g in self.groups):
            raise LeanfmError(f"metric groups must be a list of names from {', '.join(GROUPS)}, got {self.groups!r}")
        if not self.groups:
            raise LeanfmError(f"no metric group selected; pass --metrics with one or more of: {', '.join(GROUPS)}")
        for name in ("seqlen", "batch", "prompt", "gen", "repeats", "threads", "warmup", "image_size", "train_per_class",
                     "test_per_class", "steps", "samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise LeanfmError(f"--{name.replace('_', '-')} must be a whole number (got {v!r})")
        if not isinstance(self.compile, bool):
            raise LeanfmError(f"compile must be true or false (got {self.compile!r})")
        for name in ("max_eval_tokens", "max_fidelity_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise LeanfmError(f"--{name.replace('_', '-')} must be a whole number or all (got {v!r})")
        check_threads(self.threads)
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise LeanfmError(f"unknown metric group '{bad[0]}'; choose from: {', '.join(GROUPS)}")
        for name in ("seqlen", "batch", "prompt", "gen", "repeats", "threads", "image_size", "train_per_class", "test_per_class",
                     "steps", "samples"):
            if getattr(self, name) < 1:
                raise LeanfmError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.seqlen < 2:
            raise LeanfmError("--seqlen must be at least 2")
        if self.max_fidelity_tokens is not None and self.max_fidelity_tokens < 1:
            raise LeanfmError(f"--max-fidelity-tokens must be positive (got {self.max_fidelity_tokens})")
        if self.max_eval_tokens is not None and self.max_eval_tokens < 1:
            raise LeanfmError(f"--max-eval-tokens must be positive (got {self.max_eval_tokens})")
        if self.warmup < 0:
            raise LeanfmError("--warmup must be 0 or more")
        from ..models.device import check_device

        check_device(self.device, self.dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = list(self.groups)
        return d
