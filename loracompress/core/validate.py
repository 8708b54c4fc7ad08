"""Checks every options object and public function shares, so the library refuses what the CLI refuses.

``nan`` passes a check such as ``if x < 0: refuse`` (every comparison with it is false), so each float
setting is first required to be finite, here, once for all fields of an options dataclass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import fields, is_dataclass
from typing import Any

from loracompress.errors import LoraCompressError


def flag(name: str) -> str:
    """The command-line flag of an options field: ``kd_weight`` -> ``--kd-weight``."""
    return "--" + name.replace("_", "-")


def require_finite(name: str, value: Any) -> None:
    """A float that is NaN or ±Inf is refused, naming the option."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LoraCompressError(f"{name} must be a finite number (got {value}); give a number")


def reject_nonfinite(options: Any) -> None:
    """Every float field of the dataclass ``options`` is finite (called by each options ``__post_init__``)."""
    assert is_dataclass(options)
    for f in fields(options):
        require_finite(flag(f.name), getattr(options, f.name))


def require_type(name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    """``value`` is one of ``types`` (a bool is never taken for a number), else a one-line error naming it.

    A public function given, say, a string where it wants an ``Adapter`` fails here with what it wants,
    not deep inside with an ``AttributeError``.
    """
    wants_bool = types is bool or (isinstance(types, tuple) and bool in types)
    if not isinstance(value, types) or (isinstance(value, bool) and not wants_bool):
        raise LoraCompressError(f"{name} must be {what}, got {type(value).__name__} {_short(value)}")


def require_int(name: str, value: Any, minimum: int) -> int:
    """A whole number (not a bool) of at least ``minimum``."""
    require_type(name, value, numbers.Integral, "a whole number")  # numpy's integers too
    if value < minimum:
        raise LoraCompressError(f"{name} must be at least {minimum} (got {value})")
    return int(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
