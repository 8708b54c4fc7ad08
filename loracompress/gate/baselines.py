"""Baseline files of earlier measurements (``report --json``), read and written atomically."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loracompress.core import jsonio
from loracompress.errors import LoraCompressError
from loracompress.gate.measure import read_json_object

log = logging.getLogger(__name__)

#: Marks a baseline file; bump when its layout changes incompatibly.
BASELINE_FORMAT = "loracompress-sizes/1"
#: The measurements a baseline holds and ``check --baseline`` compares, with their units.
GROWTH_METRICS = {"params": "params", "bytes": "bytes", "max_rank": "rank"}


def load_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """The ``adapters`` table of a baseline file (written by ``report --json``), validated."""
    fix = "regenerate it with `loracompress report PATH... --json > FILE` or `check --update-baseline`"
    if not path.is_file():
        raise LoraCompressError(f"baseline {path}: no such file; {fix}")
    doc = read_json_object(path, f"baseline {path}", fix)
    if not isinstance(doc.get("adapters"), dict):
        raise LoraCompressError(f"baseline {path}: expected an object with an \"adapters\" table; {fix}")
    if doc.get("format", BASELINE_FORMAT) != BASELINE_FORMAT:
        raise LoraCompressError(f"baseline {path}: format {doc.get('format')!r} is not {BASELINE_FORMAT!r}; {fix}")
    for key, entry in doc["adapters"].items():
        if not isinstance(entry, dict):
            raise LoraCompressError(f"baseline {path}: entry {key!r} is not an object; {fix}")
        if not any(entry.get(metric) is not None for metric in GROWTH_METRICS):  # it would pass anything
            raise LoraCompressError(
                f"baseline {path}: entry {key!r} holds no sizes ({', '.join(GROWTH_METRICS)}), so nothing could be "
                f"compared with it; {fix}"
            )
        for metric in GROWTH_METRICS:
            value = entry.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise LoraCompressError(f"baseline {path}: {key}.{metric} = {value!r} is not a whole number >= 0; {fix}")
    return doc["adapters"]


def baseline_doc(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"format": BASELINE_FORMAT, "adapters": {k: dict(entries[k]) for k in sorted(entries)}}


def baseline_text(entries: Mapping[str, Mapping[str, Any]]) -> str:
    return jsonio.dumps(baseline_doc(entries), indent=2, sort_keys=True) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it, so a reader never sees half a file. A symlink is written
    through: its target gets the new text and the link stays (a baseline kept elsewhere and linked in)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if not path.parent.is_dir():  # else the open below says ENOENT, which reads like a permission problem
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise LoraCompressError(f"cannot write {path}: the folder {path.parent} {what}; create the folder or pass "
                                "a --baseline path in an existing one")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LoraCompressError(f"cannot write {path}: {err.strerror or err}; check the folder's permissions") from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write: no temporary file is left beside the baseline
        tmp.unlink(missing_ok=True)
        raise
