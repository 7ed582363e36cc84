"""leanfm: make foundation models resource-efficient, and prove it with measurements.

```python
import leanfm
model, tok = leanfm.load("smollm2-135m")
leanfm.apply_(model, leanfm.RTNConfig(bits=4, group_size=64))
result = leanfm.measure(model, tok)
```
"""
from .api import Calibration, apply_, calibration, load, measure
from .config import BaseConfig, methods
from .errors import LeanfmError
from .measure.protocol import Protocol
from .methods.quantize.rtn import RTNConfig
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = [
    "BaseConfig", "Calibration", "LeanfmError", "Protocol", "RTNConfig", "Recipe",
    "apply_", "calibration", "load", "load_recipe", "measure", "methods",
]
