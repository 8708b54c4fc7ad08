"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from loracompress.core.units import human, human_bytes

__all__ = ["console", "err_console", "human", "human_bytes", "print_json"]

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
