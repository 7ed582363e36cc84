"""A diffusers pipeline as a leanfm model (family ``diffusion-pipeline``): a folder with
``model_index.json`` (what ``DiffusionPipeline.save_pretrained`` writes), sampled by the
pipeline's own ``__call__`` with its own scheduler.

:class:`PipelineModel` registers the pipeline's denoiser (``unet``) as its one child module, so
the generic ``nn.Linear`` methods (rtn, hqq, magnitude) compress the denoiser's linears and leave
the text encoder and VAE as they are; the diffusion methods change the scheduler (``dpm-solver``),
the step count (``sampling-steps``) or how the UNet runs across steps (``deepcache``,
``tome-unet``). ``steps`` is the step count a method set (None: the protocol's).

Protocol conditions: sample ``j`` of a run has seed ``j`` (its initial latent drawn from its own
``torch.Generator``) and, for a text-conditioned pipeline, the prompt ``PROMPTS[j % 8]``; the
pipeline's defaults for everything else (guidance scale, image size).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeanfmError
from ..kernels.modules import held_bytes

MODEL_TYPE = "diffusers-pipeline"
RUNTIME_STEPS = "leanfm-runtime-steps.json"  # recipe steps that act when sampling, applied again at load
PROMPTS = ("a red house by a lake", "a cat sleeping on a sofa", "a mountain road at sunset", "a bowl of fruit on a table",
           "a city street in the rain", "a sailing boat on the sea", "a forest path in autumn", "a portrait of an old man")


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


class _Config:
    model_type = MODEL_TYPE

    def __init__(self, class_name: str):
        self.class_name = class_name

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "pipeline": self.class_name}


class PipelineModel(nn.Module):
    """A diffusers pipeline and the step count its methods set (see the module doc)."""

    def __init__(self, pipe):
        super().__init__()
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, nn.Module):
            raise LeanfmError(f"{type(pipe).__name__} has no UNet denoiser (pipe.unet); leanfm runs UNet diffusion pipelines "
                              "(DDPMPipeline, DDIMPipeline, StableDiffusionPipeline and the like)")
        self.pipe = pipe
        self.unet = unet
        self.config = _Config(type(pipe).__name__)
        self.steps: int | None = None
        self.resets: list = []  # per-sample states of methods (DeepCache's cache), cleared before every generate
        pipe.set_progress_bar_config(disable=True)
        self._params = set(inspect.signature(pipe.__call__).parameters)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def weight_bytes(self) -> int:
        """Bytes of the denoiser's parameters and buffers as held (the part leanfm's methods change)."""
        return held_bytes(self.unet)

    def file_bytes(self) -> int:
        """Bytes of every component's weights (denoiser, text encoder, VAE) as held in memory."""
        return held_bytes(*(m for m in self.pipe.components.values() if isinstance(m, nn.Module)))

    def condition_kwargs(self, seeds: list[int]) -> dict:
        """The call's condition: a prompt per seed for a text-conditioned pipeline, else the batch size."""
        if "prompt" in self._params:
            return {"prompt": [PROMPTS[s % len(PROMPTS)] for s in seeds]}
        if "batch_size" in self._params:
            return {"batch_size": len(seeds)}
        raise LeanfmError(f"{type(self.pipe).__name__}.__call__ takes neither prompt nor batch_size; leanfm cannot condition it")

    def save_pretrained(self, folder, runtime_steps: list[dict] | None = None) -> None:
        """The pipeline as ``DiffusionPipeline.save_pretrained`` lays it out (``model_index.json``,
        one folder per component, the scheduler a method chose in ``scheduler/``), except a UNet
        with packed int layers, written in leanfm's packed format in ``unet/`` (``load_pipeline``
        rebuilds it). ``runtime_steps``: steps that act when sampling (step count, DeepCache,
        ToMe), kept in ``RUNTIME_STEPS`` for ``leanfm.load`` to apply again."""
        from ..kernels.checkpoint import quantized_layers, save_quantized

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.pipe.save_config(str(folder))  # model_index.json: every component's library and class
        for name, comp in self.pipe.components.items():
            if comp is None:
                continue
            if comp is self.unet and quantized_layers(comp):
                save_quantized(comp, folder / name)
            else:
                comp.save_pretrained(str(folder / name))
        if runtime_steps:
            (folder / RUNTIME_STEPS).write_text(json.dumps(runtime_steps, indent=1))

    @torch.inference_mode()
    def generate(self, seeds: list[int], steps: int) -> np.ndarray:
        """``[len(seeds), C, H, W]`` float images of the pipeline's own call with ``self.steps`` (else
        ``steps``) inference steps; sample j's noise comes from ``seeds[j]`` alone."""
        for reset in self.resets:
            reset()
        n = self.steps or steps
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = self.pipe(**self.condition_kwargs(seeds), generator=gens, num_inference_steps=n, output_type="np")
        images = out.images if hasattr(out, "images") else out[0]
        return np.ascontiguousarray(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2))


def load_pipeline(folder) -> PipelineModel:
    """The pipeline saved in ``folder`` (``model_index.json``), in fp32 on the CPU; one-line errors
    for a missing diffusers or an unreadable folder."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise LeanfmError("loading a diffusers pipeline needs diffusers: pip install 'leanfm[diffusion]'") from None
    folder = Path(folder)
    try:
        json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise LeanfmError(f"{folder / 'model_index.json'} is not readable JSON ({' '.join(str(e).split())[:120]}); "
                          "re-save the pipeline with save_pretrained") from None
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # leanfm shows its own progress; per-load bars are noise
    diffusers_logging.disable_progress_bar()
    try:
        packed = _packed_unet(folder)
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, **({"unet": packed} if packed else {}))
    except (OSError, ValueError, TypeError, AttributeError, ImportError, KeyError, RuntimeError) as e:
        raise LeanfmError(f"could not load the diffusers pipeline in {folder}: {' '.join(str(e).split())[:200]}") from None
    return PipelineModel(pipe).eval()


def runtime_steps(folder) -> list[dict]:
    """The sampling-time steps a compressed pipeline folder keeps (none for a plain one)."""
    f = Path(folder) / RUNTIME_STEPS
    if not f.is_file():
        return []
    try:
        steps = json.loads(f.read_text())
    except ValueError as e:
        raise LeanfmError(f"{f} is not valid JSON ({e}); re-run leanfm compress") from None
    if not isinstance(steps, list) or not all(isinstance(s, dict) and "method" in s for s in steps):
        raise LeanfmError(f"{f} must hold a list of recipe steps ({{method: ...}}); re-run leanfm compress")
    return steps


def _packed_unet(folder: Path):
    """The UNet of ``folder/unet`` when leanfm wrote it packed: built from its config with its
    parameters on the meta device, the packed layers rebuilt from their codes, the rest loaded."""
    from ..kernels.checkpoint import MANIFEST, install_packed_layers, read_quant_manifest
    from ..kernels.meta import params_on_meta

    d = folder / "unet"
    if not (d / MANIFEST).is_file():
        return None
    import diffusers
    from safetensors.torch import load_file

    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index["unet"][1])
    with params_on_meta():
        unet = cls.from_config(cls.load_config(str(d)))
    man = read_quant_manifest(d)
    tensors = load_file(str(d / "model.safetensors"))
    used: set[str] = set()

    def take(name: str):
        used.add(name)
        return tensors[name]

    install_packed_layers(unet, d, man, take, tensors.__contains__)
    missing, unexpected = unet.load_state_dict({k: v for k, v in tensors.items() if k not in used}, strict=False, assign=True)
    qnames = tuple(n + "." for n in man["layers"])
    missing = [k for k in missing if not k.startswith(qnames)]
    if missing or unexpected:
        raise LeanfmError(f"{d} does not match its config: missing {missing[:3]}, unexpected {list(unexpected)[:3]}; "
                          "re-run leanfm compress")
    return unet.eval()
