"""Where the torch runtime runs a model: ``--device cpu|cuda`` and ``--dtype fp32|bf16|fp16``.

Methods and calibration run on the CPU in fp32 (leanfm's solvers are written for it); the model
is then placed on the device in the dtype for measurement. leanfm's packed int4/int8 layers are
CPU kernels: on CUDA a quantized recipe runs through ``--runtime vllm`` (its compressed-tensors
export), not through them. A dtype the device cannot compute in is refused before any work:
fp16 on a CPU without fp16 arithmetic (avx512_fp16 / amx_fp16), bf16 on a GPU without it. bf16 on
a CPU without avx512_bf16 / amx_bf16 runs, emulated by torch (slow); :func:`describe` says which.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LeanfmError
from ..sysinfo import cpu_flags

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str, dtype: str) -> None:
    """Refuse, in one line, a device torch does not see or a dtype it cannot compute in there."""
    if device not in DEVICES:
        raise LeanfmError(f"unknown device '{device}'; use one of: {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise LeanfmError(f"unknown dtype '{dtype}'; use one of: {', '.join(DTYPES)}")
    if device == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise LeanfmError(f"--device cuda: torch sees no GPU ({why}, torch {torch.__version__}); use --device cpu")
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise LeanfmError(f"--dtype bf16: {torch.cuda.get_device_name()} has no bf16 arithmetic; use --dtype fp16 or fp32")
    elif dtype == "fp16" and not cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        raise LeanfmError("--dtype fp16: this CPU has no fp16 arithmetic (no avx512_fp16 or amx_fp16 flag); use --dtype fp32 or bf16")


def describe(device: str, dtype: str) -> dict:
    """What ran: device name and whether the dtype's arithmetic is native there."""
    if device == "cuda":
        return {"device": "cuda", "device_name": torch.cuda.get_device_name(), "dtype": dtype}
    native = {"fp32": True, "bf16": bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
              "fp16": bool(cpu_flags() & {"avx512_fp16", "amx_fp16"})}[dtype]
    return {"device": "cpu", "dtype": dtype, "dtype_native": native}


def place(model: nn.Module, device: str, dtype: str) -> nn.Module:
    """Move ``model`` to ``device`` in ``dtype``. Packed quantized layers stay as they are: they
    are CPU kernels that pick their own activation dtype (the run's ``kernel`` flag says which)."""
    from ..kernels.checkpoint import quantized_embeddings, quantized_layers

    if (device, dtype) == ("cpu", "fp32"):
        return model
    if quantized_layers(model) or quantized_embeddings(model):
        if device == "cuda":
            raise LeanfmError("--device cuda: leanfm's packed int4/int8 layers are CPU kernels; measure a quantized recipe on a "
                              "GPU with --runtime vllm, or use --device cpu")
        raise LeanfmError(f"--dtype {dtype}: leanfm's packed int4/int8 layers choose their own activation dtype (see the run's "
                          "kernel flag); use --dtype fp32 with a quantizing recipe")
    return model.to(device=device, dtype=DTYPES[dtype])
