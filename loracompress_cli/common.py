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


def skipped_line(skipped: list[dict[str, str]] | None, record: str) -> str | None:
    """``left out 18 LoRA modules or keys that PEFT does not load (adapter_config.json); listed in RECORD``."""
    if not skipped:
        return None
    return (f"left out {len(skipped)} LoRA module{'s' if len(skipped) != 1 else ''} or keys that PEFT does not load "
            f"(see adapter_config.json's target_modules / layers_to_transform / exclude_modules); listed in {record}")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
