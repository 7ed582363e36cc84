"""The Python API: ``load``, ``apply_``, ``measure``, ``calibration``."""
from __future__ import annotations

import torch
from torch import nn

from .config import BaseConfig, check_family, config_from_dict, lookup
from .data.calib import Calibration, calibration  # noqa: F401
from .errors import LeanfmError
from .measure.run import measure  # noqa: F401
from .models.load import load as _load
from .recipe import Recipe, load_recipe


def load(name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer=None) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer in eval mode (``models.load.load``: an alias, a local folder
    or a hub id). A diffusers pipeline that ``leanfm compress`` wrote gets its sampling-time steps
    (step count, DeepCache, ToMe) applied again, recorded in ``leanfm_info["steps"]``."""
    model, tok = _load(name_or_path, dtype, tokenizer)
    if model.leanfm_info.get("family") == "diffusion-pipeline":
        from .models.pipeline import runtime_steps

        for step in runtime_steps(model.leanfm_info["path"]):
            apply_(model, step)
            model.leanfm_info["steps"][-1]["from_checkpoint"] = True
    return model, tok


def _calib_tensor(model: nn.Module, calib):
    if calib is None or isinstance(calib, torch.Tensor):
        return calib
    if isinstance(calib, Calibration):
        tok = getattr(model, "leanfm_info", {}).get("tokenizer")
        if tok is None:
            raise LeanfmError("calibration by dataset name needs the model's tokenizer: load the model with leanfm.load, or pass token ids")
        return calib.tokens(tok)
    raise LeanfmError(f"calib must be leanfm.calibration(...) or a LongTensor of token ids, got {type(calib).__name__}")


def apply_(model: nn.Module, config: BaseConfig | Recipe | dict | str, calib=None) -> nn.Module:
    """Apply a technique (config, dict, recipe or recipe name) to ``model`` in place; return it.

    Each applied step is recorded in ``model.leanfm_info["steps"]`` with ``simulated`` and
    ``kernel``, which the measurement reports as the run's flags.
    """
    if not isinstance(model, nn.Module):
        raise LeanfmError(f"apply_ needs the model first (a torch nn.Module from leanfm.load), got {type(model).__name__}")
    if not isinstance(config, (BaseConfig, Recipe, dict, str)):
        raise LeanfmError(f"apply_ takes a method config (e.g. leanfm.RTNConfig(bits=4)), a dict like {{'method': 'rtn', 'bits': 4}}, "
                          f"a Recipe or a recipe name, not {type(config).__name__} {config!r}")
    if isinstance(config, (Recipe, str)):
        recipe = load_recipe(config)
        torch.manual_seed(recipe.seed)
        for step in recipe.steps:
            apply_(model, step, calib)
        return model
    if isinstance(config, dict):
        config = config_from_dict(config)
    config.validate()
    from .models.family import family_of

    check_family(config, family_of(model))
    _, handler = lookup(config.method)
    if config.needs_calibration and calib is None:
        raise LeanfmError(f"method {config.method} needs calibration data: pass calib=leanfm.calibration(...)")
    ids = _calib_tensor(model, calib) if config.needs_calibration else None
    if ids is not None and hasattr(model, "config") and ids.dim() == 2:
        from .models.family import max_context

        if ids.shape[1] > max_context(model):
            raise LeanfmError(
                f"calibration windows of {ids.shape[1]} tokens exceed the model's context of {max_context(model)}; lower --calib-seqlen"
            )
    info = handler(model, config, ids)
    if config.produces not in ("kv-policy", "decoding-policy"):  # weights replaced: let the fp32 file mapping go
        from .models.mapped import copy_out_of_mapped_files

        copy_out_of_mapped_files(model)
    if not hasattr(model, "leanfm_info"):
        model.leanfm_info = {"steps": []}
    model.leanfm_info["steps"].append({**config.to_dict(), **info})
    return model
