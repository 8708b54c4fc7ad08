"""Thresholds of the CI gate: parameter/byte/rank limits and quality bounds, parsed from flags or config."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loracompress.core.budget import Budget
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)


_ENTRY_KEYS = ("path", "max_params", "max_bytes", "max_rank", "min_quality", "max_quality", "message")
_BOUND = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|=)\s*(\S+)\s*$")


def parse_amount(raw: object, kind: str, what: str) -> int:
    """A parameter count (``kind="params"``: ``2M``, ``300k``) or a size (``"bytes"``: ``4MB``, ``4MiB``).

    Suffixed text goes through :meth:`Budget.parse`, so thresholds read exactly like budgets;
    a bare number is a plain count (a threshold has no fractions, so ``500`` is not ambiguous).
    """
    example = "2M, 300k or 2000000" if kind == "params" else "4MB, 4MiB or 4000000"
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise LoraCompressError(f"{what} = {raw!r}: expected a number or text like {example}")
    text = str(raw).strip()
    try:
        number: float | None = float(text.replace("_", "").replace(",", ""))
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0 or number != int(number):
            raise LoraCompressError(f"{what} = {raw!r}: expected a whole number >= 0 or text like {example}")
        return int(number)
    try:
        budget = Budget.parse(text)
    except LoraCompressError:
        raise LoraCompressError(f"{what} = {raw!r}: cannot parse; write it like {example}") from None
    if budget.kind != kind:
        found = {"params": "a parameter count", "bytes": "a size in bytes", "fraction": "a fraction",
                 "rank": "a rank"}[budget.kind]
        raise LoraCompressError(f"{what} = {raw!r} is {found}; write it like {example}")
    return int(budget.value)


def parse_rank(raw: object, what: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise LoraCompressError(f"{what} = {raw!r}: expected a whole number >= 1")
    return raw


def parse_tolerance(raw: object, what: str = "tolerance") -> float:
    """``"2%"`` or ``0.02`` -> 0.02: the growth allowed against a baseline, as a fraction."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise LoraCompressError(f"{what} = {raw!r}: expected a percentage like 2% or a fraction like 0.02")
    text = str(raw).strip()
    pct = text.endswith("%")
    try:
        value = float(text[:-1] if pct else text) / (100 if pct else 1)
    except ValueError:
        raise LoraCompressError(f"{what} = {raw!r}: expected a percentage like 2% or a fraction like 0.02") from None
    if not math.isfinite(value) or value < 0:
        raise LoraCompressError(f"{what} = {raw!r}: must be a percentage >= 0 (e.g. 2%)")
    return value


@dataclass(frozen=True)
class QualityBound:
    """``metric >= value`` (a ``min_quality``) or ``metric <= value`` (a ``max_quality``).

    ``metric`` is a dotted path into the ``quality`` section of ``compression_report.json``
    (``accuracy.after``; a bare ``accuracy`` means its ``after``; ``accuracy.retained`` is
    ``after / before`` unless the report stores it), or a top-level number of the report
    (``retained_energy``, ``param_ratio``).
    """

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str, op: str) -> QualityBound:
        """``"accuracy.retained>=0.99"`` (or ``=0.99``) for ``op=">="``; ``"kl.after<=0.05"`` for ``"<="``."""
        flag = "--min-quality" if op == ">=" else "--max-quality"
        m = _BOUND.match(text)
        if m is None:
            raise LoraCompressError(
                f"{flag} {text!r}: write METRIC{op}VALUE or METRIC=VALUE, e.g. '{_example(op)}' "
                "(quote it: an unquoted > is a shell redirect)"
            )
        if m[2] not in ("=", op):
            other = "--max-quality" if op == ">=" else "--min-quality"
            raise LoraCompressError(f"{flag} {text!r}: {flag} takes {op}; for a bound the other way use {other}")
        return cls(m[1], op, _quality_number(m[3], f"{flag} {text!r}"))

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def holds(self, value: float) -> bool:
        return value >= self.value if self.op == ">=" else value <= self.value


def _example(op: str) -> str:
    return "accuracy.retained>=0.99" if op == ">=" else "kl.after<=0.05"


def _quality_number(raw: object, what: str) -> float:
    try:
        value = float(raw) if not isinstance(raw, bool) else float("nan")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise LoraCompressError(f"{what}: the bound must be a finite number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Thresholds:
    """One set of limits, from the flags or one config entry. ``None`` means "not checked"."""

    max_params: int | None = None
    max_bytes: int | None = None
    max_rank: int | None = None
    quality: tuple[QualityBound, ...] = ()
    message: str | None = None
    source: str = "flags"

    @property
    def empty(self) -> bool:
        return self.max_params is None and self.max_bytes is None and self.max_rank is None and not self.quality

    @classmethod
    def from_entry(cls, raw: Mapping[str, Any], where: str) -> Thresholds:
        """Validate one config entry (a TOML table); ``where`` names it in error messages."""
        unknown = sorted(set(raw) - set(_ENTRY_KEYS))
        if unknown:
            raise LoraCompressError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(_ENTRY_KEYS)}")
        bounds: list[QualityBound] = []
        for key, op in (("min_quality", ">="), ("max_quality", "<=")):
            table = raw.get(key, {})
            if not isinstance(table, Mapping):
                metric, bound = _example(op).split(op)
                raise LoraCompressError(f'{where}: {key} must be a table of metric = number, e.g. {key} = {{"{metric}" = {bound}}}')
            for metric, value in table.items():
                if not _BOUND.match(f"{metric}{op}0"):
                    raise LoraCompressError(f"{where}: {key} metric {metric!r} is not a dotted name like accuracy.retained")
                bounds.append(QualityBound(metric, op, _quality_number(value, f"{where}: {key}.{metric}")))
        message = raw.get("message")
        if message is not None and not isinstance(message, str):
            raise LoraCompressError(f"{where}: message must be a string")
        thresholds = cls(
            max_params=parse_amount(raw["max_params"], "params", f"{where}: max_params") if "max_params" in raw else None,
            max_bytes=parse_amount(raw["max_bytes"], "bytes", f"{where}: max_bytes") if "max_bytes" in raw else None,
            max_rank=parse_rank(raw["max_rank"], f"{where}: max_rank") if "max_rank" in raw else None,
            quality=tuple(bounds),
            message=message,
            source=where,
        )
        if thresholds.empty:
            raise LoraCompressError(f"{where}: no threshold; give max_params, max_bytes, max_rank, min_quality or max_quality")
        return thresholds
