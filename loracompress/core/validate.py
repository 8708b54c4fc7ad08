"""Checks every options object and public function shares, so the library refuses what the CLI refuses.

``nan`` passes a check such as ``if x < 0: refuse`` (every comparison with it is false), so each float
setting is first required to be finite, here, once for all fields of an options dataclass.
"""

from __future__ import annotations

import math
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
