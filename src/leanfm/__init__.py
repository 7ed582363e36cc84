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
# Every method's config class (``leanfm.GPTQConfig``, ...) is exported too, found in the method
# registry by class name (the torch-free declarations), so no list of them is kept here.
_EXPORTS = {
    "Calibration": "api", "apply_": "api", "calibration": "api", "load": "api", "measure": "api",
    "BaseConfig": "config", "available_methods": "config",
    "LeanfmError": "errors",
    "Protocol": "measure.protocol",
    "Recipe": "recipe", "load_recipe": "recipe",
    "predict": "predict",
    "tune": "training.run",
}

__version__ = "0.1.0"


def _config_classes() -> dict:
    from .config import config_class, methods

    classes = {}
    for m in methods():
        for cls in config_class(m).__mro__:  # the method's class and its shared bases (WeightQuantConfig, ...)
            if cls.__name__.endswith("Config") and cls.__module__.startswith("leanfm.methods."):
                classes[cls.__name__] = cls
    return classes


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name.endswith("Config") and name in (configs := _config_classes()):
        value = configs[name]
    else:
        raise AttributeError(f"module 'leanfm' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_config_classes()))


__all__ = sorted(_EXPORTS)  # plus the config classes: dir(leanfm)
