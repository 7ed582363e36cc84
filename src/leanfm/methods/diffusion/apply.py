"""Handlers of the diffusion methods (``decl.py``): each changes a ``DenoiserModel`` (ONNX) or a
``PipelineModel`` (diffusers) in place."""
from __future__ import annotations

from ...errors import LeanfmError


def _denoiser(model, method: str):
    from ...models.denoiser import DenoiserModel

    if not isinstance(model, DenoiserModel):
        raise LeanfmError(f"{method} applies to an ONNX diffusion denoiser (e.g. terrain-cm), not {type(model).__name__}")
    return model


def _pipeline(model, method: str):
    from ...models.pipeline import PipelineModel

    if not isinstance(model, PipelineModel):
        raise LeanfmError(f"{method} applies to a diffusers pipeline (a folder with model_index.json), not "
                          f"{type(model).__name__}")
    return model


def _is_pipeline(model) -> bool:
    from ...models.pipeline import PipelineModel

    return isinstance(model, PipelineModel)


def apply_steps(model, cfg, calib=None) -> dict:
    if _is_pipeline(model):
        model.steps = cfg.steps
        return {"simulated": False, "kernel": f"torch: {cfg.steps} {type(model.scheduler).__name__} step(s) per sample"}
    m = _denoiser(model, cfg.method)
    m.steps = cfg.steps
    return {"simulated": False, "kernel": f"ONNX Runtime, {cfg.steps} consistency step(s) per sample"}


def apply_dpm_solver(model, cfg, calib=None) -> dict:
    from diffusers import DPMSolverMultistepScheduler

    m = _pipeline(model, cfg.method)
    before = type(m.scheduler).__name__
    m.pipe.scheduler = DPMSolverMultistepScheduler.from_config(m.scheduler.config, solver_order=cfg.order,
                                                               algorithm_type=cfg.algorithm)
    return {"simulated": False, "replaced_scheduler": before,
            "kernel": f"torch: DPM-Solver ({cfg.algorithm}, order {cfg.order}) in place of {before}"}


def apply_tome_unet(model, cfg, calib=None) -> dict:
    from .tome_unet import apply_tome_unet as tome

    m = _pipeline(model, cfg.method)
    state = tome(m.unet, cfg.ratio, cfg.max_downsample, cfg.stride, cfg.seed)
    m.resets.append(state.reset)
    return {"simulated": False, "kernel": f"torch: ToMe merges {cfg.ratio:g} of the tokens in self-attention at "
                                          f"downsampling <= {cfg.max_downsample} (real shorter attention)"}


def apply_deepcache(model, cfg, calib=None) -> dict:
    from .deepcache import split

    if _is_pipeline(model):
        from .deepcache_torch import TorchDeepCache

        cache = TorchDeepCache(model.unet, cfg.interval)
        model.resets.append(cache.reset)
        return {"simulated": False, "kernel": f"torch: full UNet every {cfg.interval} steps, else its shallow path "
                                              "(first down block, last up block) on the cached deep feature"}
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
