"""Technique configs and the registry that maps a method name to its handler.

A technique is a small dataclass (its parameters, with defaults and validation) plus a handler
registered for it. ``leanfm.apply_(model, config, calib=...)`` is the one verb that runs any of
them; recipes are lists of such configs written as YAML.
"""
from __future__ import annotations

import dataclasses
import typing
from importlib import import_module
from typing import Any, Callable, ClassVar

from .errors import LeanfmError


@dataclasses.dataclass
class BaseConfig:
    """Base of all technique configs. Subclasses set ``method`` and may override ``validate``."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        """Raise LeanfmError if the parameters are inconsistent."""

    def check_model(self, model) -> None:
        """Raise LeanfmError if this config cannot apply to ``model`` (checked before any work)."""

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


Handler = Callable[..., dict]
_REGISTRY: dict[str, tuple[type[BaseConfig], Handler]] = {}


def register(config_cls: type[BaseConfig]) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config, calib) -> step_info`` for a config class.

    ``step_info`` is a dict with at least ``simulated`` (bool: True when the technique only
    emulates its effect, e.g. fake-quantized fp32 weights) and ``kernel`` (what executes it).
    """

    def deco(fn: Handler) -> Handler:
        if not config_cls.method:
            raise ValueError(f"{config_cls.__name__} has no method name")
        _REGISTRY[config_cls.method] = (config_cls, fn)
        return fn

    return deco


def _load_builtins() -> None:
    import_module("leanfm.methods.builtin")  # registers every built-in method


def methods() -> list[str]:
    """Names of the registered methods (the built-in ones included)."""
    _load_builtins()
    return sorted(_REGISTRY)


available_methods = methods  # exported as leanfm.available_methods (leanfm.methods is the subpackage)


def lookup(method: str) -> tuple[type[BaseConfig], Handler]:
    _load_builtins()
    if method not in _REGISTRY:
        raise LeanfmError(f"unknown method '{method}'; known methods: {', '.join(methods())}")
    return _REGISTRY[method]


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_from_dict(d: dict[str, Any], where: str = "") -> BaseConfig:
    """Build and validate a config from ``{"method": ..., **params}``.

    ``where`` prefixes error messages (e.g. "recipe foo.yaml line 4: ").
    """
    if not isinstance(d, dict) or "method" not in d:
        raise LeanfmError(f"{where}each step needs a 'method' key, e.g. {{method: rtn, bits: 8}}")
    params = dict(d)
    method = params.pop("method")
    try:
        cls, _ = lookup(str(method))
    except LeanfmError as e:
        raise LeanfmError(f"{where}{e}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in fields:
            raise LeanfmError(
                f"{where}unknown parameter '{key}' for method {method}; "
                f"valid parameters: {', '.join(fields) or '(none)'}"
            )
        if not _type_ok(value, hints[key]):
            raise LeanfmError(
                f"{where}parameter '{key}' of method {method} must be {_type_name(hints[key])}, "
                f"got {value!r}"
            )
        if isinstance(value, list):
            params[key] = tuple(value)
    cfg = cls(**params)
    try:
        cfg.validate()
    except LeanfmError as e:
        raise LeanfmError(f"{where}{e}") from None
    return cfg
