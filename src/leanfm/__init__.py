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
from .methods.quantize.awq import AWQConfig
from .methods.quantize.gptq import GPTQConfig
from .methods.quantize.hqq import HQQConfig
from .methods.quantize.rtn import RTNConfig
from .methods.quantize.smoothquant import SmoothQuantConfig
from .methods.decoding.policy import EarlyExitConfig, SpeculativeConfig
from .methods.kvcache.policies import H2OConfig, KVQuantConfig, SnapKVConfig, StreamingLLMConfig
from .methods.lowrank.lowrank import ASVDConfig, SVDConfig
from .methods.prune.sparsity import MagnitudeConfig, SparseGPTConfig, WandaConfig
from .methods.structured.layerdrop import LayerDropConfig
from .methods.structured.width import WidthPruneConfig
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = [
    "AWQConfig", "BaseConfig", "Calibration", "GPTQConfig", "HQQConfig", "LeanfmError", "Protocol", "RTNConfig", "Recipe",
    "SmoothQuantConfig", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "LayerDropConfig", "WidthPruneConfig",
    "SVDConfig", "ASVDConfig", "StreamingLLMConfig", "H2OConfig", "SnapKVConfig", "KVQuantConfig", "SpeculativeConfig",
    "EarlyExitConfig",
    "apply_", "calibration", "load", "load_recipe", "measure", "methods",
]
