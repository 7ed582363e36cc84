"""The measurement protocol (GUIDE section 4): every number leanfm prints comes from here."""
from .protocol import GROUPS, Protocol  # noqa: F401
