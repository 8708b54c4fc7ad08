"""Measuring an adapter folder: LoRA parameters, bytes on disk, max rank, recorded quality."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracompress.core.dtypes import dtype_name
from loracompress.core.reader import load_adapter
from loracompress.core.records import COMPRESSION_REPORT
from loracompress.errors import LoraCompressError
from loracompress.gate.config import CheckConfig, baseline_key, display_path, resolve_targets
from loracompress.gate.thresholds import Thresholds

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """What ``report`` prints and a baseline stores for one adapter folder."""

    path: str
    params: int
    extra_params: int
    bytes: int
    max_rank: int
    modules: int
    dtype: str
    report: dict[str, Any] | None = None

    def sizes(self) -> dict[str, Any]:
        """The baseline entry."""
        return {"params": self.params, "extra_params": self.extra_params, "bytes": self.bytes,
                "max_rank": self.max_rank, "modules": self.modules, "dtype": self.dtype}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file below ``folder`` (links to files count their target, as a copy would)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                log.debug("skipping unreadable %s", Path(dirpath) / name)
    return total


def read_report(folder: Path) -> dict[str, Any] | None:
    """The folder's ``compression_report.json``, or None when there is none."""
    path = folder / COMPRESSION_REPORT
    return read_json_object(path, str(path), "re-run the compression that wrote it") if path.is_file() else None


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraCompressError(f"{what}: not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise LoraCompressError(f"{what}: cannot be read ({err.strerror or err}); {fix}") from None
    if not isinstance(doc, dict):
        raise LoraCompressError(f"{what}: expected a JSON object; {fix}")
    return doc


def measure(folder: Path, display: str) -> Measurement:
    adapter = load_adapter(folder)
    return Measurement(
        path=display,
        params=adapter.num_params,
        extra_params=adapter.extra_params,
        bytes=folder_bytes(folder),
        max_rank=adapter.max_rank,
        modules=len(adapter.modules),
        dtype=dtype_name(adapter.dtype),
        report=read_report(folder),
    )


def quality_value(report: Mapping[str, Any] | None, metric: str) -> float | None:
    """Resolve a :class:`QualityBound` metric in a compression report (see there); None when absent."""
    if report is None:
        return None
    quality = report.get("quality") or {}
    parts = metric.split(".")
    node: Any = quality if isinstance(quality, Mapping) and parts[0] in quality else report
    for i, part in enumerate(parts):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif part == "retained" and i == len(parts) - 1 and isinstance(node, Mapping):
            before, after = _number(node.get("before")), _number(node.get("after"))
            return after / before if before and after is not None else None
        else:
            return None
    if isinstance(node, Mapping):
        node = node.get("after")
    return _number(node)


def quality_metrics(report: Mapping[str, Any] | None) -> list[str]:
    """The metric names a report offers, for error messages."""
    if report is None:
        return []
    names = [k for k, v in report.items() if _number(v) is not None and k != "seconds"]
    for name, value in (report.get("quality") or {}).items():
        if isinstance(value, Mapping):
            names += [f"{name}.{k}" for k, v in value.items() if _number(v) is not None]
            if {"before", "after"} <= set(value):
                names.append(f"{name}.retained")
        elif _number(value) is not None:
            names.append(name)
    return names


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def report_sizes(paths: Sequence[str], config: CheckConfig, cwd: Path) -> tuple[list[Measurement], dict[str, dict[str, Any]]]:
    """Measurements for ``report``: one per target, and the baseline entries keyed relative to the root."""
    targets = resolve_targets(paths, config, Thresholds(), cwd, verb="report")
    measurements = [measure(t.path, display_path(t.path, cwd)) for t in targets]
    entries = {baseline_key(t.path, config.root): m.sizes() for t, m in zip(targets, measurements)}
    return measurements, entries
