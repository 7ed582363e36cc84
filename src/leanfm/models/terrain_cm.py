"""``terrain-cm``: the one-step terrain consistency-model UNet shipped as fp32 ONNX inside
``adaptive-terrain-diffusion==0.4.2`` (MIT), run in ONNX Runtime.

The network is an EDM-style denoiser distilled into a consistency model ("consistency-unet-32",
endpoint distillation from a 20-step teacher, per the file's metadata): ``denoised =
f(noisy, sigma, difficulty)`` maps a noisy 128x128 heightmap at noise level ``sigma`` (0.002 to
80; data scaled to a standard deviation of 0.5) straight to a clean one; ``difficulty`` (1 to
100) conditions the terrain. It has no torch weights, so leanfm runs it where it ships, in ONNX
Runtime, and the diffusion techniques work on its graph (:mod:`leanfm.methods.diffusion`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PACKAGE = "terrain_diffusion"
INSTALL = "pip install --no-deps adaptive-terrain-diffusion==0.4.2"  # its metadata asks for onnxruntime-gpu
ONNX_FILE = "weights/terrain_consistency_unet_difficulty100.onnx"
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5
SIZE = 128
CONDITIONS = (10.0, 30.0, 50.0, 70.0, 90.0)  # difficulty by seed: seed s gets CONDITIONS[s % 5]


def onnx_path() -> Path:
    """The packaged ONNX file, or a one-line error naming the install command."""
    from .packaged import packaged_file

    return packaged_file("terrain-cm", PACKAGE, ONNX_FILE, INSTALL)


def save_pretrained(dest) -> dict:
    """Write the ``terrain-cm`` denoiser folder (``models/denoiser.py``) around the packaged graph:
    the ONNX file and its config (noise range, 1x128x128 samples, the ``difficulty`` condition
    cycling through 10, 30, 50, 70, 90); returns what the cache records about its source."""
    import shutil

    from .denoiser import DenoiserConfig
    from .packaged import sha256_file

    path = onnx_path()
    cfg = DenoiserConfig(onnx="terrain_cm.onnx", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA, channels=1,
                         size=SIZE, cond_input="difficulty", conditions=list(CONDITIONS))
    shutil.copyfile(path, Path(dest) / cfg.onnx)
    cfg.save_pretrained(dest)
    return {"onnx": f"{PACKAGE}/{ONNX_FILE}", "onnx_sha256": sha256_file(path)}


class OnnxDenoiser:
    """``denoise(x, sigma, cond) -> x0`` on an ONNX Runtime session of a terrain-cm-style graph
    (inputs ``noisy`` [B, 1, H, W], ``sigma`` [B], ``difficulty`` [B]); ``extra`` names further
    outputs to return (a cache tensor), ``feeds`` further inputs (a cached tensor)."""

    def __init__(self, model: bytes | str | Path, threads: int = 2, extra: tuple[str, ...] = ()):
        from ..runtimes.onnxrt import cpu_session

        self.session = cpu_session(model, threads)
        self.outputs = [self.session.get_outputs()[0].name, *extra]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def __call__(self, x: np.ndarray, sigma: np.ndarray, cond: np.ndarray, **feeds):
        feed = {"noisy": x.astype(np.float32, copy=False), "sigma": sigma.astype(np.float32, copy=False),
                "difficulty": cond.astype(np.float32, copy=False), **feeds}
        out = self.session.run(self.outputs, {k: v for k, v in feed.items() if k in self.input_names})
        return out[0] if len(out) == 1 else out
