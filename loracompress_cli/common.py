"""Small helpers shared by the command modules."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

from loracompress.core import jsonio

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


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def print_json(obj: Any) -> None:
    sys.stdout.write(jsonio.dumps(obj, indent=2, default=str) + "\n")
