"""leanfm: make foundation models resource-efficient, and prove it with measurements.

```python
import leanfm
model, tok = leanfm.load("smollm2-135m")
leanfm.apply_(model, leanfm.RTNConfig(bits=4, group_size=64))
result = leanfm.measure(model, tok)
```
"""
from importlib import import_module

# Public names -> the module defining them. Imported on first use (PEP 562), so that light
# commands (``leanfm predict``, ``leanfm models``) start without loading torch and transformers.
_EXPORTS = {
    "Calibration": "api", "apply_": "api", "calibration": "api", "load": "api", "measure": "api",
    "BaseConfig": "config", "available_methods": "config",
    "LeanfmError": "errors",
    "Protocol": "measure.protocol",
    "AWQConfig": "methods.quantize.awq", "GPTQConfig": "methods.quantize.gptq", "HQQConfig": "methods.quantize.hqq",
    "RTNConfig": "methods.quantize.rtn", "SmoothQuantConfig": "methods.quantize.smoothquant",
    "EarlyExitConfig": "methods.decoding.policy", "SpeculativeConfig": "methods.decoding.policy",
    "H2OConfig": "methods.kvcache.policies", "KVQuantConfig": "methods.kvcache.policies",
    "SnapKVConfig": "methods.kvcache.policies", "StreamingLLMConfig": "methods.kvcache.policies",
    "ASVDConfig": "methods.lowrank.lowrank", "SVDConfig": "methods.lowrank.lowrank",
    "MagnitudeConfig": "methods.prune.sparsity", "SparseGPTConfig": "methods.prune.sparsity",
    "WandaConfig": "methods.prune.sparsity",
    "LayerDropConfig": "methods.structured.layerdrop", "WidthPruneConfig": "methods.structured.width",
    "Recipe": "recipe", "load_recipe": "recipe",
    "predict": "predict",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leanfm' has no attribute '{name}'")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
