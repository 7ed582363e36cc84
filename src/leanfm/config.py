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


class NotPriced(LeanfmError):
    """A method whose declaration gives the predictor no cost effect."""


@dataclasses.dataclass
class BaseConfig:
    """Base of all technique configs: the one declaration of a method.

    A subclass with a ``method`` name registers itself on definition. It declares, torch-free:
    its parameters (dataclass fields: defaults and types), ``validate`` (parameter checks) and
    ``check_model`` (fit to a model), ``families`` (the model families it applies to),
    ``handler`` (``"module:function"``, imported on first
    apply), ``needs_calibration``, ``produces`` (what the step leaves in the model, one of
    :data:`PRODUCES`), ``adds_metrics`` (metrics its runs report beyond the protocol's), and
    ``effect`` (what it does to cost, for the predictor), ``search_space`` (what a recipe search
    may vary, :mod:`leanfm.space`). The first docstring line is its
    description in ``leanfm methods``.
    """

    method: ClassVar[str] = ""
    handler: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...]] = ("causal-lm",)  # the model families it applies to (models/family.py)
    produces: ClassVar[str] = ""
    adds_metrics: ClassVar[tuple[str, ...]] = ()
    search_space: ClassVar[dict] = {}  # parameter -> leanfm.space.Choice | Range (empty: not searched)
    # how the step runs on an onloaded model (a checkpoint larger than memory, one decoder layer
    # in RAM at a time, leanfm.models.onload): "layerwise" (the handler walks the decoder with
    # LayerwiseRunner.run, which reads, writes and releases each layer), "per-layer" (no
    # calibration, linear by linear: applied to one decoder layer at a time), "outside" (touches
    # only modules outside the decoder stack, e.g. the embedding table); "" needs the whole model
    onload: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            _REGISTRY[cls.method] = cls

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        """Raise LeanfmError if the parameters are inconsistent."""

    def check_model(self, model) -> None:
        """Raise LeanfmError if this config cannot apply to ``model`` (checked before any work)."""

    def effect(self, eff) -> None:
        """Record this step's cost effect on ``eff`` (:class:`leanfm.methods.effects.Effects`).
        A method that cannot be priced says so with ``eff.unmodelled.append(reason)``."""
        raise NotPriced(f"the predictor cannot price method '{self.method}': its declaration has no cost effect; "
                        "drop the step from the recipe to predict the rest")

    def onload_check(self) -> str | None:
        """Why this configuration cannot run onloaded although its method can (None: it can)."""
        return None

    def layer_work_bytes(self, linears: list[tuple[int, int]], inputs: list[int] | None = None) -> int:
        """Peak bytes the step's algorithm holds while it processes one decoder layer whose linears
        are ``[(in_features, out_features), ...]`` in the order they run, ``inputs[j]`` naming
        the input linear ``j`` reads (equal for linears fed the same tensor, as q/k/v; None: one
        input each), beyond the layer's fp32 weights and the calibration activations (the memory
        plan of ``leanfm compress``). Default: none."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The declaration as data (``leanfm methods --json``)."""
        hints = typing.get_type_hints(cls)
        params = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            params.append({"name": f.name, "type": _type_name(hints[f.name]),
                           "default": list(default) if isinstance(default, tuple) else default})
        doc = (cls.__doc__ or "").strip()
        return {"method": cls.method, "description": " ".join(doc.split("\n\n")[0].split()),
                "config": cls.__name__, "families": list(cls.families), "needs_calibration": _class_flag(cls, "needs_calibration"),
                "produces": cls.produces, "adds_metrics": list(cls.adds_metrics), "onload": cls.onload or None,
                "priced": cls.effect is not BaseConfig.effect, "parameters": params,
                "search_space": {k: str(v) for k, v in cls.search_space.items()}}


# What a step leaves in the model (``produces``): the storage format it writes or what it attaches.
PRODUCES = {
    "int-weights": "integer weight codes with scales (packed for a kernel, or fake-quantized fp32)",
    "int-embeddings": "the token embedding table as integer codes with scales (shared with a tied LM head)",
    "sparse-weights": "zeroed weights (masked in dense fp32, or CSR)",
    "smaller-dense": "a smaller dense model (layers or channels removed, config rewritten)",
    "low-rank": "each linear replaced by two low-rank factors",
    "kv-policy": "a KV-cache policy attached to the model (weights untouched)",
    "decoding-policy": "a generation policy attached to the model (weights untouched)",
    "tuned-weights": "float weights updated by training (adapters merged in), same shapes and cost",
    "token-reduction": "fewer tokens per block at run time (weights untouched)",
    "sampling-schedule": "a diffusion model's sampler set to fewer denoising steps (weights untouched)",
    "feature-cache": "a diffusion model run with deep features reused across steps (weights untouched)",
    "int8-graph": "int8 weight codes in the denoiser's ONNX graph (and uint8 activations where chosen)",
}


def _class_flag(cls, name: str) -> bool | str:
    v = getattr(cls, name)
    return v if isinstance(v, bool) else "depends on parameters"


Handler = Callable[..., dict]
_REGISTRY: dict[str, type[BaseConfig]] = {}
_HANDLERS: dict[str, Handler] = {}


def register(config_cls: type[BaseConfig]) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config, calib) -> step_info`` for a config class (for methods
    defined outside leanfm; built-in ones name their handler in the declaration).

    ``step_info`` is a dict with at least ``simulated`` (bool: True when the technique only
    emulates its effect, e.g. fake-quantized fp32 weights) and ``kernel`` (what executes it).
    """

    def deco(fn: Handler) -> Handler:
        if not config_cls.method:
            raise ValueError(f"{config_cls.__name__} has no method name")
        _REGISTRY[config_cls.method] = config_cls
        _HANDLERS[config_cls.method] = fn
        return fn

    return deco


def _load_builtins() -> None:
    """Import every ``leanfm/methods/<family>/decl.py`` (torch-free declarations); found on
    disk, so adding a family needs no list."""
    from pathlib import Path

    root = Path(__file__).parent / "methods"
    for decl in sorted(root.glob("*/decl.py")):
        import_module(f"leanfm.methods.{decl.parent.name}.decl")


def methods() -> list[str]:
    """Names of the registered methods (the built-in ones included)."""
    _load_builtins()
    return sorted(_REGISTRY)


available_methods = methods  # exported as leanfm.available_methods (leanfm.methods is the subpackage)


def registered(method: str) -> type[BaseConfig] | None:
    """The config class registered under ``method`` now, or None (e.g. a step recorded by loading
    a checkpoint); unlike :func:`config_class`, it neither loads the built-ins nor raises."""
    return _REGISTRY.get(method)


def config_class(method: str) -> type[BaseConfig]:
    _load_builtins()
    if method not in _REGISTRY:
        raise LeanfmError(f"unknown method '{method}'; known methods: {', '.join(methods())}")
    return _REGISTRY[method]


def methods_for(family: str) -> list[str]:
    """The registered methods that apply to models of ``family``."""
    return [m for m in methods() if family in _REGISTRY[m].families]


def check_family(config: BaseConfig, family: str) -> None:
    """Refuse, in one line, a method that does not apply to a model of ``family``."""
    if family not in config.families:
        ok = methods_for(family)
        raise LeanfmError(f"method '{config.method}' does not apply to a {family} model (it applies to: "
                          f"{', '.join(config.families)}); methods for {family} models: {', '.join(ok) or 'none yet'}")


def lookup(method: str) -> tuple[type[BaseConfig], Handler]:
    """The config class and the handler (imported now, with the torch code it needs)."""
    cls = config_class(method)
    if method not in _HANDLERS:
        if not cls.handler:
            raise LeanfmError(f"method '{method}' declares no handler; set {cls.__name__}.handler = 'module:function'")
        mod, _, fn = cls.handler.partition(":")
        _HANDLERS[method] = getattr(import_module(mod), fn)
    return cls, _HANDLERS[method]


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
        cls = config_class(str(method))
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
