"""DeepCache on a diffusers UNet in torch (Ma et al., CVPR 2024), beside the ONNX version (``deepcache.py``).

A full step runs the UNet as it is and keeps the output of its second-to-last up block: the deep
branch's result, upsampled to full resolution, that the last up block reads. A cached step runs
only the shallow path: the time embedding, ``conv_in`` and the first down block (for the skip
connections the last up block reads), then the last up block fed the cached feature, and the
output head.

Nothing of the UNet's forward is rewritten: on a cached step the deep modules (down blocks after
the first, the mid block, the up blocks before the last two) are swapped for stubs that return
their input at once, and the second-to-last up block returns the cache, while diffusers' own
forward runs around them. Works for ``UNet2DModel`` and ``UNet2DConditionModel`` with the usual
block types (the skip-connection ``*Skip*`` blocks are refused).
"""
from __future__ import annotations

from torch import nn

from ...errors import LeanfmError


def _passthrough(*args, **kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _down_stub(block: nn.Module):
    """What a skipped down block returns: its input and as many (unread) skip tensors as it makes."""
    n = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)

    def stub(*args, **kwargs):
        h = _passthrough(*args, **kwargs)
        return h, (h,) * n

    return stub


class TorchDeepCache:
    """Installs itself as ``unet.forward``: a full pass every ``interval`` calls, cached passes in
    between; ``reset()`` before each new batch of samples; counts ``full_calls``/``shallow_calls``."""

    def __init__(self, unet: nn.Module, interval: int):
        ups, downs = getattr(unet, "up_blocks", None), getattr(unet, "down_blocks", None)
        if ups is None or downs is None or len(ups) < 2 or len(downs) < 2:
            raise LeanfmError(f"DeepCache needs a UNet with at least 2 down and 2 up blocks (diffusers UNet2DModel or "
                              f"UNet2DConditionModel), not {type(unet).__name__}")
        odd = [type(b).__name__ for b in [*downs, *ups] if "Skip" in type(b).__name__]
        if odd:
            raise LeanfmError(f"DeepCache does not handle the skip-connection block {odd[0]} of this UNet")
        if hasattr(unet, "leanfm_deepcache"):
            raise LeanfmError("deepcache is already applied to this UNet; use one deepcache step")
        self.unet, self.interval = unet, interval
        self.cached = ups[-2]
        # what each skipped deep module returns on a cached step: its input (a down block: with its skip tensors)
        mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
        self.stubs = {**{m: _down_stub(m) for m in downs[1:]}, **{m: _passthrough for m in [*mid, *ups[:-2]]}}
        self.full_calls = self.shallow_calls = 0
        self._orig = unet.forward
        self.cached.register_forward_hook(self._keep)
        unet.forward = self.forward
        unet.leanfm_deepcache = self
        self.reset()

    def reset(self) -> None:
        self._k, self._cache, self._capture = 0, None, False

    def _keep(self, module, args, output):
        if self._capture:
            self._cache = output

    def forward(self, sample, *args, **kwargs):
        full = self._k % self.interval == 0 or self._cache is None or self._cache.shape[0] != sample.shape[0]
        self._k += 1
        if full:
            self._capture = True
            try:
                out = self._orig(sample, *args, **kwargs)
            finally:
                self._capture = False
            self.full_calls += 1
            return out
        cache = self._cache
        stubs = {**self.stubs, self.cached: lambda *a, **k: cache}
        for m, f in stubs.items():
            m.forward = f
        try:
            out = self._orig(sample, *args, **kwargs)
        finally:
            for m in stubs:
                del m.forward
        self.shallow_calls += 1
        return out
