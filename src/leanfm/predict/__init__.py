"""Roofline cost prediction: hardware profiles, kernel availability, model analysis."""
from .hardware import known_hardware, load_hardware
from .analyzer import predict  # noqa: E402,F401  (roofline analyzer: model x recipe x hardware)
