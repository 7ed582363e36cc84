"""The measurement protocol (GUIDE section 4): every number leanfm prints comes from here.

The package is also the API function: ``leanfm.measure(model, tok, ...)`` calls
:func:`leanfm.measure.run.measure`.
"""
from .._callable import make_callable
from .protocol import GROUPS, Protocol  # noqa: F401

make_callable(__name__, "leanfm.measure.run", "measure")
