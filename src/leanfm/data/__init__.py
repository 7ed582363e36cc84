"""Text corpora by name and a seeded calibration sampler."""
from .calib import Calibration, calibration  # noqa: F401
from .text import DATASETS, load_text  # noqa: F401
