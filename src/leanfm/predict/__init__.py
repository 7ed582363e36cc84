"""Roofline cost prediction: hardware profiles, kernel availability, model analysis.

The package is also the API function: ``leanfm.predict(model, recipe, hardware, ...)`` calls
:func:`leanfm.predict.analyzer.predict`.
"""
from .._callable import make_callable
from .hardware import known_hardware, load_hardware
from .analyzer import predict  # noqa: E402,F401  (roofline analyzer: model x recipe x hardware)

make_callable(__name__, "leanfm.predict.analyzer", "predict")
