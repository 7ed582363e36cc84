"""A diffusion denoiser that runs as an ONNX graph (family ``diffusion``), with its sampler's settings.

leanfm's diffusion methods (``methods/diffusion``) change what a sample costs without training:
the graph (int8 weights), the sampler (fewer consistency steps) or how the graph is run across
steps (DeepCache). :class:`DenoiserModel` holds all three so that ``leanfm.apply_`` can change
them like it changes an LLM's linears: ``proto`` (the ONNX ModelProto), ``steps`` (None: the
protocol's), ``cache_interval`` (None: no feature caching).

A folder holds ``config.json`` (``model_type: leanfm-onnx-denoiser``; the file name, the noise
range, the sample shape, the condition input and the conditions the protocol cycles through) and
the ONNX file. The graph takes ``noisy [B, C, H, W]``, ``sigma [B]`` and optionally one condition
``[B]`` and returns the denoised sample (an EDM-style denoiser or a consistency model); the
``terrain-cm`` alias writes such a folder around the packaged terrain UNet.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import LeanfmError

MODEL_TYPE = "leanfm-onnx-denoiser"


class DenoiserConfig:
    """The fields of a denoiser folder's ``config.json`` (see the module doc)."""

    model_type = MODEL_TYPE

    def __init__(self, onnx: str = "denoiser.onnx", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, channels: int = 1, size: int = 128, cond_input: str | None = None,
                 conditions: list | None = None, steps: int | None = None, cache_interval: int | None = None, **_):
        self.onnx, self.sigma_min, self.sigma_max, self.sigma_data = onnx, float(sigma_min), float(sigma_max), float(sigma_data)
        self.channels, self.size = int(channels), int(size)
        self.cond_input, self.conditions = cond_input, [float(c) for c in (conditions or [0.0])]
        self.steps, self.cache_interval = steps, cache_interval  # the sampler settings a compressed folder keeps

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "onnx": self.onnx, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "channels": self.channels, "size": self.size, "cond_input": self.cond_input,
                "conditions": self.conditions, "steps": self.steps, "cache_interval": self.cache_interval}

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2))


class DenoiserModel(nn.Module):
    """An ONNX denoiser and how it is sampled (see the module doc). No torch parameters: the
    weights live in ``proto``; ``methods/diffusion/run.py`` builds its ONNX Runtime sessions and samples."""

    def __init__(self, proto, config: DenoiserConfig):
        super().__init__()
        self.proto, self.config = proto, config
        self.steps: int | None = None
        self.cache_interval: int | None = None

    def file_bytes(self) -> int:
        return len(self.proto.SerializeToString())

    def weight_bytes(self) -> int:
        """Bytes of the graph's constant tensors (weights, biases, scales) as stored."""
        from onnx import numpy_helper

        return sum(numpy_helper.to_array(t).nbytes for t in self.proto.graph.initializer)

    def input_names(self) -> dict:
        """The graph's input names for the roles noisy, sigma and cond (None: no condition)."""
        return {"noisy": self.proto.graph.input[0].name, "sigma": self.proto.graph.input[1].name,
                "cond": self.config.cond_input}

    def save_pretrained(self, folder) -> None:
        """The folder :func:`load_denoiser` reads back: the current graph and config, with the sampler
        settings methods set (step count, DeepCache interval)."""
        import onnx

        self.config.steps, self.config.cache_interval = self.steps, self.cache_interval
        self.config.save_pretrained(folder)
        onnx.save(self.proto, str(Path(folder) / self.config.onnx))


class OnnxGraphDenoiser:
    """``denoise(x, sigma, cond, **feeds)`` on one ONNX Runtime session; ``names`` maps the roles
    noisy / sigma / cond to the graph's input names (cond None: the graph takes no condition);
    ``extra`` names further outputs returned after the first."""

    def __init__(self, model: bytes, threads: int, names: dict, extra: tuple[str, ...] = ()):
        from ..runtimes.onnxrt import cpu_session

        self.session = cpu_session(model, threads)
        self.names = names
        self.outputs = [self.session.get_outputs()[0].name, *extra]
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, x: np.ndarray, sigma: np.ndarray, cond: np.ndarray, **feeds):
        feed = {self.names["noisy"]: x.astype(np.float32, copy=False), self.names["sigma"]: sigma.astype(np.float32, copy=False),
                **feeds}
        if self.names.get("cond"):
            feed[self.names["cond"]] = cond.astype(np.float32, copy=False)
        out = self.session.run(self.outputs, {k: v for k, v in feed.items() if k in self.inputs})
        return out[0] if len(out) == 1 else out


def is_denoiser(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def load_denoiser(folder) -> DenoiserModel:
    """The :class:`DenoiserModel` saved in ``folder``; one-line errors for a missing or unreadable graph."""
    import onnx

    folder = Path(folder)
    cfg = DenoiserConfig(**json.loads((folder / "config.json").read_text()))
    f = folder / cfg.onnx
    if not f.is_file():
        raise LeanfmError(f"denoiser folder {folder} has no {cfg.onnx}; rebuild it (delete the folder and load it again)")
    try:
        proto = onnx.load(str(f))
    except Exception as e:  # onnx raises DecodeError and friends for a damaged file
        raise LeanfmError(f"{f} is not a readable ONNX file ({' '.join(str(e).split())[:160]}); rebuild it") from None
    if len(proto.graph.input) < 2:
        raise LeanfmError(f"{f} has {len(proto.graph.input)} input(s); a denoiser takes noisy and sigma (and a condition)")
    model = DenoiserModel(proto, cfg).eval()
    model.steps, model.cache_interval = cfg.steps, cfg.cache_interval
    return model
