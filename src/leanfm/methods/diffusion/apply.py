"""Handlers of the diffusion methods (``decl.py``): each changes a ``DenoiserModel`` in place."""
from __future__ import annotations

from ...errors import LeanfmError


def _denoiser(model, method: str):
    from ...models.denoiser import DenoiserModel

    if not isinstance(model, DenoiserModel):
        raise LeanfmError(f"{method} applies to an ONNX diffusion denoiser (e.g. terrain-cm), not {type(model).__name__}")
    return model


def apply_steps(model, cfg, calib=None) -> dict:
    m = _denoiser(model, cfg.method)
    m.steps = cfg.steps
    return {"simulated": False, "kernel": f"ONNX Runtime, {cfg.steps} consistency step(s) per sample"}


def apply_deepcache(model, cfg, calib=None) -> dict:
    from .deepcache import split

    m = _denoiser(model, cfg.method)
    _, shallow, tensor = split(m.proto)  # refuses a graph without an upsampling to cache at, before any sampling
    m.cache_interval = cfg.interval
    return {"simulated": False, "kernel": f"ONNX Runtime: full graph every {cfg.interval} steps, else its shallow half",
            "cache_tensor": tensor, "shallow_nodes": len(shallow.graph.node), "full_nodes": len(m.proto.graph.node)}


def apply_int8(model, cfg, calib=None) -> dict:
    import onnx

    from .int8_onnx import calibration_feeds, quantize_int8, weight_only_int8
    from .sampling import step_sigmas

    m = _denoiser(model, cfg.method)
    if not cfg.activations:
        m.proto, n = weight_only_int8(m.proto)
        return {"simulated": False, "weights_converted": n,
                "kernel": "ONNX Runtime: int8 weights in the graph, dequantized to fp32 once when the session loads "
                          "(fp32 compute)"}
    c = m.config
    sigmas = sorted({float(s) for n in (1, 2, 4, 8) for s in step_sigmas(n, c.sigma_min, c.sigma_max)})
    feeds = calibration_feeds(list(range(1000, 1000 + cfg.calib_seeds)), sigmas, c.conditions, (c.channels, c.size, c.size),
                              c.sigma_data)
    names = m.input_names()
    feeds = [{names["noisy"]: f["noisy"], names["sigma"]: f["sigma"], **({names["cond"]: f["difficulty"]} if names["cond"] else {})}
             for f in feeds]
    m.proto = onnx.load_from_string(quantize_int8(m.proto.SerializeToString(), feeds))
    return {"simulated": False, "calibration_inputs": len(feeds),
            "kernel": "ONNX Runtime: QDQ int8 weights and uint8 activations (integer Conv/MatMul kernels)"}
