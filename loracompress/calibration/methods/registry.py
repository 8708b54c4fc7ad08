"""Method names -> classes, imported lazily so ``import loracompress`` stays light."""

from __future__ import annotations

import importlib
import inspect
import math
import types
import typing
from typing import Any

from loracompress.calibration.methods.base import Method
from loracompress.errors import LoraCompressError

#: name -> "module:Class" under loracompress.calibration.methods
CALIBRATION_METHODS: dict[str, str] = {
    "prilora": "prilora:PriLoRA",
    "lorpa": "lorpa:LoRPA",
    "increlora": "increlora:IncreLoRA",
    "dylora": "dylora:DyLoRA",
    "adalora": "adalora:AdaLoRA",
}


def get_method(name: str, **settings: Any) -> Method:
    """Instantiate a calibration method by name."""
    spec = CALIBRATION_METHODS.get(name.lower())
    if spec is None:
        known = ", ".join(["svd", *CALIBRATION_METHODS])
        raise LoraCompressError(f"unknown method {name!r}; choose one of {known}")
    module_name, cls_name = spec.split(":")
    module = importlib.import_module(f"loracompress.calibration.methods.{module_name}")
    cls = getattr(module, cls_name)
    settings = check_settings(name.lower(), cls, settings)
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:  # a range check a method raised as a plain Python error
        raise LoraCompressError(f"{name}: bad -O setting ({err}); see docs/methods.md for each setting") from None


def check_settings(name: str, cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` checked against ``cls.__init__``: known names, values of the annotated type.

    ``-O`` values arrive as JSON scalars or strings, so a typo'd key or ``beta=abc`` must become a
    one-line error here rather than a TypeError deep inside a method. Whole-number floats are
    accepted for int settings (``-O rounds=2.0``) and ints for float ones.
    """
    params = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    hints = typing.get_type_hints(cls.__init__)
    checked: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise LoraCompressError(f"{name} has no setting {key!r}; known: {known}")
        checked[key] = _coerce(name, key, value, hints.get(key, Any))
    return checked


def _coerce(name: str, key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if hint is Any or value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if kind is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is bool and isinstance(value, bool):
            return value
    want = " or ".join(_KINDS.get(k, getattr(k, "__name__", str(k))) for k in allowed)
    raise LoraCompressError(f"{name} setting {key}={value!r} must be {want}; fix the -O {key}=... value")


_KINDS = {float: "a finite number", int: "a whole number", str: "text", bool: "true or false", type(None): "null"}
