"""Numbers for people, both ways: parameter counts and byte sizes in the short forms every summary line uses
(:func:`human`, :func:`human_bytes`), and the one table of units that sizes are read with (:func:`parse_size`,
for ``--budget 4MB`` and ``merge --max-shard-size 2GB``)."""

from __future__ import annotations

import re

#: Byte sizes by their lower-case unit: SI (1 kB = 1000 B) and IEC (1 KiB = 1024 B).
BYTE_UNITS: dict[str, int] = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
#: Counts by their suffix (``1.2M`` parameters); a size without a byte unit reads the same way (``2G``: 2 GB).
COUNT_UNITS: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_QUANTITY = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", flags=re.IGNORECASE)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def human_bytes(n: float) -> str:
    """3 * 2**20 -> '3 MiB'."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, *, bare: bool = False) -> float | None:
    """``text`` as bytes: a number and a unit of :data:`BYTE_UNITS` (``2GB``, ``500 MB``, ``1.5GiB``); with
    ``bare``, also a plain number or a :data:`COUNT_UNITS` suffix (``4096``, ``2G``). Case is ignored.

    None when ``text`` is not in that form. The value is not checked (it may be 0, negative or infinite): each
    caller refuses it in the words of its own flag.
    """
    m = _QUANTITY.fullmatch(str(text))
    units = {**COUNT_UNITS, **BYTE_UNITS} if bare else BYTE_UNITS
    unit = m[2].lower() if m else ""
    if m is None or unit not in units:
        return None
    return float(m[1]) * units[unit]
