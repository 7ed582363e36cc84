"""Models built without storage: every parameter on the meta device until a loader fills it.

Building a 7B model from its config allocates and initializes 28 GB of fp32 parameters that a
loader then overwrites. Under :func:`params_on_meta` each parameter a module registers goes to
the meta device instead (shape and dtype, no memory, no initialization cost); buffers stay where
they are created (rotary tables and scales are computed from the config and small).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def params_on_meta():
    """Inside the block, every parameter a module registers is put on the meta device."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config, bare: bool = False) -> nn.Module:
    """The causal LM of ``config`` (``bare``: the model without a head, e.g. a ViT encoder) with
    its parameters on the meta device, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    with params_on_meta():
        model = (AutoModel if bare else AutoModelForCausalLM).from_config(config, dtype=torch.float32)
    return model.eval()


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` has no storage yet (an onloaded layer)."""
    return any(t.is_meta for t in [*module.parameters(recurse=True), *module.buffers(recurse=True)])


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that alias another (tied) parameter -> the name kept in the checkpoint
    (the first under which ``named_parameters`` meets it)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases
