"""Method names -> classes, imported lazily so ``import loracompress`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.methods.base import Method

#: name -> "module:Class" under loracompress.methods
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
    module = importlib.import_module(f"loracompress.methods.{module_name}")
    return getattr(module, cls_name)(**settings)
