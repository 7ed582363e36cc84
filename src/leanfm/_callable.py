"""Packages that double as the API function of the same name.

``leanfm.measure`` and ``leanfm.predict`` are public functions *and* subpackages. Python binds a
subpackage to its parent's attribute the moment anything imports it, so after ``leanfm.load``
(which imports ``leanfm.measure.*``) the name would be the module and ``leanfm.measure(...)``
would fail. Making the package module callable keeps both meanings working.
"""
from __future__ import annotations

import sys
import types
from importlib import import_module


def make_callable(package: str, module: str, function: str) -> None:
    """Calling the package ``package`` calls ``module.function`` (imported on first call)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(import_module(module), function)(*args, **kwargs)

    sys.modules[package].__class__ = _CallablePackage
