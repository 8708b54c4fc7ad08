"""Every JSON file (and JSON text) loracompress writes goes through here, and is strict JSON.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON: ``JSON.parse``,
``jq`` and most other readers reject the whole file. A measured value that is not a finite number
(a KL of an empty split, an overflowed perplexity) is written as ``null``; ``allow_nan=False`` then
guarantees that nothing else slips through.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by ``None`` (containers are copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` ``value``; what ``default`` returns is made strict too."""
    hook = None if default is None else (lambda obj: strict(default(obj)))
    return json.dumps(strict(value), allow_nan=False, default=hook, **kwargs)


def write_json(path: Path, value: Any, **kwargs: Any) -> None:
    """Write ``value`` as strict JSON, indented by 2 unless told otherwise, with a final newline."""
    kwargs.setdefault("indent", 2)
    path.write_text(dumps(value, **kwargs) + "\n", encoding="utf-8")
