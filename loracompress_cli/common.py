"""Small helpers shared by the command modules."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

from loracompress.core import jsonio
from loracompress.core.units import human, human_bytes

__all__ = ["console", "err_console", "human", "human_bytes", "no_breaks", "print_json", "skipped_line"]

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


#: Characters that end a line for a log reader (GitHub's runner among them): in a message they would start
#: a new line, and a line starting with ``::`` is a workflow command (``::error``, ``::add-mask``, ...).
_LINE_BREAKS = frozenset({*map(chr, range(0x20)), "\x7f", "\x85", "\u2028", "\u2029"} - {"\t"})


def no_breaks(text: str) -> str:
    """``text`` on one line: line breaks and other control characters percent-encoded as GitHub's
    workflow commands encode them (``\n`` -> ``%0A``), so a folder name or a ``--message`` cannot start a
    line of its own in a CI log."""
    return "".join(f"%{ord(c):02X}" if c in _LINE_BREAKS else c for c in text)


def skipped_line(skipped: list[dict[str, str]] | None, record: str) -> str | None:
    """``left out 18 LoRA modules or keys that PEFT does not load (listed with the reason in RECORD)``."""
    if not skipped:
        return None
    return f"left out {len(skipped)} LoRA modules or keys that PEFT does not load (listed with the reason in {record})"


def print_json(obj: Any) -> None:
    sys.stdout.write(jsonio.dumps(obj, indent=2, default=str) + "\n")
