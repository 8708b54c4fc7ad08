"""The CI size-regression gate behind ``loracompress check`` and ``loracompress report``.

An adapter folder is *measured* (LoRA parameters, bytes of every file on disk, max rank,
and the quality recorded in its ``compression_report.json``) and the measurement is held
against *thresholds* (from flags or a config file) and, optionally, a *baseline* of earlier
measurements with a growth tolerance.

Config lives in ``[tool.loracompress.check]`` of ``pyproject.toml`` or in ``[check]`` of
``loracompress.toml`` (the same table without the ``tool.loracompress`` prefix), found from
the working folder upward or given with ``--config``::

    [tool.loracompress.check]
    baseline = "sizes.json"          # optional; keys are adapter paths relative to the root
    tolerance = "2%"                 # growth allowed against the baseline

    [[tool.loracompress.check.adapters]]
    path = "out/*-small"             # a folder, a glob (** allowed) or a list of them
    max_params = "2M"                # LoRA parameters (what budgets count)
    max_bytes = "8MB"                # every file in the folder, on disk
    max_rank = 16                    # the serving cost in vLLM-style engines
    min_quality = { "accuracy.retained" = 0.99 }
    max_quality = { "kl.after" = 0.05 }
    message = "the small adapters must fit the edge budget; see docs/check.md"

Relative paths in a discovered config are relative to its folder (the *root*); in a file
given with ``--config`` they are relative to the working folder, as ruff does. Every
threshold that applies to an adapter (each matching entry, and the flags) must hold.

Nothing here prints: :func:`run_check` returns a :class:`CheckResult` and the CLI renders it.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracompress.core.adapter import CONFIG_NAME, dtype_name, load_adapter
from loracompress.core.budget import Budget
from loracompress.errors import LoraCompressError
from loracompress.gate.records import REPORT_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

CONFIG_FILE = "loracompress.toml"
PYPROJECT_FILE = "pyproject.toml"
#: Marks a baseline file; bump when its layout changes incompatibly.
BASELINE_FORMAT = "loracompress-sizes/1"
#: The measurements a baseline holds and ``check --baseline`` compares, with their units.
GROWTH_METRICS = {"params": "params", "bytes": "bytes", "max_rank": "rank"}

_ENTRY_KEYS = ("path", "max_params", "max_bytes", "max_rank", "min_quality", "max_quality", "message")
_SECTION_KEYS = ("baseline", "tolerance", "adapters")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BOUND = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|=)\s*(\S+)\s*$")


# --------------------------------------------------------------------------- thresholds


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


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Entry:
    """One ``[[...check.adapters]]`` entry: which folders, and the thresholds for them."""

    patterns: tuple[str, ...]
    thresholds: Thresholds


@dataclass(frozen=True)
class CheckConfig:
    """The parsed config. ``root`` is what relative paths (entries, baseline, its keys) are relative to."""

    root: Path
    source: Path | None = None
    entries: tuple[Entry, ...] = ()
    baseline: Path | None = None
    tolerance: float | None = None


def find_config(start: Path) -> Path | None:
    """The nearest ``loracompress.toml``, or ``pyproject.toml`` with a ``[tool.loracompress.check]`` table."""
    for folder in (start, *start.parents):
        own = folder / CONFIG_FILE
        if own.is_file():
            return own
        pyproject = folder / PYPROJECT_FILE
        if pyproject.is_file() and _section(_read_toml(pyproject), pyproject) is not None:
            return pyproject
    return None


def load_config(path: Path | None, cwd: Path) -> CheckConfig:
    """Read ``path`` (given with ``--config``), or discover one from ``cwd`` upward when ``path`` is None."""
    explicit = path is not None
    if path is None:
        path = find_config(cwd)
        if path is None:
            return CheckConfig(root=cwd)
    elif not path.is_file():
        raise LoraCompressError(f"--config {path}: no such file; give a loracompress.toml or pyproject.toml")
    path = path if path.is_absolute() else cwd / path
    section = _section(_read_toml(path), path)
    name = "[check]" if path.name != PYPROJECT_FILE else "[tool.loracompress.check]"
    if section is None:
        if explicit:
            raise LoraCompressError(f"{path}: no {name} table; add one (see docs/check.md)")
        section = {}
    root = cwd if explicit else path.parent
    unknown = sorted(set(section) - set(_SECTION_KEYS))
    if unknown:
        raise LoraCompressError(f"{path}: unknown key {unknown[0]!r} in {name}; known keys: {', '.join(_SECTION_KEYS)}")
    baseline = section.get("baseline")
    if baseline is not None and (not isinstance(baseline, str) or not baseline.strip()):
        raise LoraCompressError(f"{path}: {name} baseline must be a file path (a string)")
    tolerance = parse_tolerance(section["tolerance"], f"{path}: tolerance") if "tolerance" in section else None
    raw_entries = section.get("adapters", [])
    if not isinstance(raw_entries, list) or not all(isinstance(e, dict) for e in raw_entries):
        raise LoraCompressError(f"{path}: adapters must be an array of tables: write [[{name[1:-1]}.adapters]] entries")
    entries = []
    for i, raw in enumerate(raw_entries, 1):
        where = f"{path.name} {name[:-1]}.adapters] #{i}"
        patterns = raw.get("path")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns or not isinstance(patterns, list) or not all(isinstance(p, str) and p.strip() for p in patterns):
            raise LoraCompressError(f"{where}: path must be a folder or glob (a string) or a list of them")
        entries.append(Entry(tuple(patterns), Thresholds.from_entry(raw, where)))
    return CheckConfig(
        root=root,
        source=path,
        entries=tuple(entries),
        baseline=root / baseline if baseline else None,
        tolerance=tolerance,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise LoraCompressError(f"{path}: not valid TOML ({err}); fix the file") from None
    except OSError as err:
        raise LoraCompressError(f"{path}: cannot be read ({err.strerror or err})") from None


def _section(doc: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    table: Any = doc
    for key in ("tool", "loracompress") if path.name == PYPROJECT_FILE else ():
        table = table.get(key) if isinstance(table, Mapping) else None
    section = table.get("check") if isinstance(table, Mapping) else None
    if section is not None and not isinstance(section, dict):
        raise LoraCompressError(f"{path}: check must be a table")
    return section


# --------------------------------------------------------------------------- targets


def expand(pattern: str, base: Path) -> list[Path]:
    """Adapter folders (holding ``adapter_config.json``) that a folder path or glob names, sorted."""
    if not _GLOB_CHARS.search(pattern):
        path = base / pattern
        return [path.resolve()] if path.exists() else []
    hits = glob.glob(pattern, root_dir=base, recursive=True)
    folders = {(base / h).resolve() for h in hits}
    return sorted(p for p in folders if (p / CONFIG_NAME).is_file())


@dataclass
class Target:
    """An adapter folder to check and the thresholds that apply to it."""

    path: Path
    rules: list[Thresholds] = field(default_factory=list)


def resolve_targets(paths: Sequence[str], config: CheckConfig, flags: Thresholds, cwd: Path) -> list[Target]:
    """The folders to check: ``paths`` (folders or globs, relative to ``cwd``) or else every config entry."""
    found: dict[Path, Target] = {}
    entry_hits = [{p for pat in e.patterns for p in expand(pat, config.root)} for e in config.entries]
    if paths:
        for text in paths:
            hits = expand(text, cwd)
            if not hits:
                what = "matched no adapter folder (a folder holding adapter_config.json)" if _GLOB_CHARS.search(text) \
                    else "no such folder"
                raise LoraCompressError(f"{text}: {what}; check the path")
            for hit in hits:
                if not hit.is_dir():
                    raise LoraCompressError(f"{text}: is a file; pass the adapter folder that holds {CONFIG_NAME}")
                found.setdefault(hit, Target(hit))
    elif config.entries:
        for entry, hits in zip(config.entries, entry_hits):
            if not hits:
                raise LoraCompressError(
                    f"{entry.thresholds.source}: path {', '.join(entry.patterns)} matched no adapter folder under "
                    f"{config.root}; build the adapters first or fix the path"
                )
            for hit in sorted(hits):
                found.setdefault(hit, Target(hit))
    else:
        where = f" or add [[...check.adapters]] entries to {config.source}" if config.source else \
            " or add a [tool.loracompress.check] table to pyproject.toml (see docs/check.md)"
        raise LoraCompressError(f"nothing to check: pass adapter folders{where}")
    for target in found.values():
        target.rules = [e.thresholds for e, hits in zip(config.entries, entry_hits) if target.path in hits]
        if not flags.empty:
            target.rules.append(flags)
    return list(found.values())


def display_path(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when below it (how a user typed it), else absolute."""
    try:
        return path.relative_to(cwd.resolve()).as_posix() or "."
    except ValueError:
        return path.as_posix()


def baseline_key(path: Path, root: Path) -> str:
    """A baseline's key for an adapter folder: its path relative to the root, POSIX style."""
    return Path(os.path.relpath(path, root.resolve())).as_posix()


# --------------------------------------------------------------------------- measuring


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
    path = folder / REPORT_NAME
    return _read_json_object(path, str(path), "re-run the compression that wrote it") if path.is_file() else None


def _read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- baselines


def load_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """The ``adapters`` table of a baseline file (written by ``report --json``), validated."""
    fix = "regenerate it with `loracompress report PATH... --json > FILE` or `check --update-baseline`"
    if not path.is_file():
        raise LoraCompressError(f"baseline {path}: no such file; {fix}")
    doc = _read_json_object(path, f"baseline {path}", fix)
    if not isinstance(doc.get("adapters"), dict):
        raise LoraCompressError(f"baseline {path}: expected an object with an \"adapters\" table; {fix}")
    if doc.get("format", BASELINE_FORMAT) != BASELINE_FORMAT:
        raise LoraCompressError(f"baseline {path}: format {doc.get('format')!r} is not {BASELINE_FORMAT!r}; {fix}")
    for key, entry in doc["adapters"].items():
        if not isinstance(entry, dict):
            raise LoraCompressError(f"baseline {path}: entry {key!r} is not an object; {fix}")
        for metric in GROWTH_METRICS:
            value = entry.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise LoraCompressError(f"baseline {path}: {key}.{metric} = {value!r} is not a whole number >= 0; {fix}")
    return doc["adapters"]


def baseline_doc(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"format": BASELINE_FORMAT, "adapters": {k: dict(entries[k]) for k in sorted(entries)}}


def baseline_text(entries: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps(baseline_doc(entries), indent=2, sort_keys=True) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it, so a reader never sees half a file."""
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


# --------------------------------------------------------------------------- checking


@dataclass
class Finding:
    """One comparison: a threshold (``kind="limit"``/``"quality"``) or growth against the baseline."""

    metric: str
    kind: str
    unit: str
    value: float | None
    ok: bool
    limit: float | None = None
    op: str = "<="
    baseline: float | None = None
    message: str | None = None
    source: str = ""
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    @property
    def delta_pct(self) -> float | None:
        if self.delta is None or not self.baseline:
            return None
        return 100 * self.delta / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "kind": self.kind, "unit": self.unit, "value": self.value, "ok": self.ok,
                "limit": self.limit, "op": self.op, "baseline": self.baseline, "delta": self.delta,
                "delta_pct": self.delta_pct, "message": self.message, "source": self.source, "note": self.note}


@dataclass
class AdapterResult:
    path: str
    folder: Path
    measurement: Measurement
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "measured": self.measurement.sizes(),
                "checks": [f.to_json() for f in self.findings]}


@dataclass
class CheckResult:
    adapters: list[AdapterResult]
    baseline: Path | None = None
    tolerance: float | None = None
    baseline_updated: bool = False

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.adapters)

    @property
    def failures(self) -> list[tuple[AdapterResult, Finding]]:
        return [(a, f) for a in self.adapters for f in a.findings if not f.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "baseline": str(self.baseline) if self.baseline else None,
                "tolerance": self.tolerance, "baseline_updated": self.baseline_updated,
                "adapters": [a.to_json() for a in self.adapters]}


def threshold_findings(m: Measurement, rules: Iterable[Thresholds]) -> list[Finding]:
    findings = []
    for rule in rules:
        for metric, unit, limit, value in (("params", "params", rule.max_params, m.params),
                                           ("bytes", "bytes", rule.max_bytes, m.bytes),
                                           ("max_rank", "rank", rule.max_rank, m.max_rank)):
            if limit is not None:
                findings.append(Finding(metric, "limit", unit, value, value <= limit, limit=limit,
                                        message=rule.message, source=rule.source))
        for bound in rule.quality:
            value = quality_value(m.report, bound.metric)
            note = ""
            if value is None:
                offered = quality_metrics(m.report)
                note = (f"not measured: no {REPORT_NAME}" if m.report is None else
                        f"not in {REPORT_NAME} (it has: {', '.join(offered) or 'no quality numbers'})")
            findings.append(Finding(bound.metric, "quality", "", value, value is not None and bound.holds(value),
                                    limit=bound.value, op=bound.op, message=rule.message, source=rule.source,
                                    note=note))
    return findings


def growth_findings(m: Measurement, entry: Mapping[str, Any] | None, tolerance: float, source: str,
                    enforce: bool = True) -> list[Finding]:
    """Growth of each :data:`GROWTH_METRICS` beyond ``tolerance`` fails; shrinking passes."""
    if entry is None:
        return [Finding("baseline", "baseline", "", None, True, source=source,
                        note="new: not in the baseline; --update-baseline adds it")]
    findings = []
    for metric, unit in GROWTH_METRICS.items():
        old = entry.get(metric)
        if old is None:
            continue
        value = getattr(m, metric)
        allowed = old * (1 + tolerance)
        findings.append(Finding(metric, "baseline", unit, value, value <= allowed or not enforce,
                                limit=allowed, baseline=old, source=source,
                                note="" if enforce or value <= allowed else "accepted: baseline updated"))
    return findings


def run_check(
    paths: Sequence[str],
    flags: Thresholds,
    config: CheckConfig,
    cwd: Path,
    baseline: Path | None = None,
    tolerance: float | None = None,
    update_baseline: bool = False,
) -> CheckResult:
    """Measure every target and compare it with its thresholds and the baseline.

    ``baseline`` / ``tolerance`` override the config's. With ``update_baseline`` the baseline
    is rewritten (atomically) with the new measurements, entries for other adapters are kept,
    and growth is shown but does not fail; thresholds still do.
    """
    baseline = baseline if baseline is not None else config.baseline
    tolerance = tolerance if tolerance is not None else config.tolerance
    if baseline is None and (update_baseline or tolerance is not None):
        raise LoraCompressError(
            f"{'--update-baseline' if update_baseline else '--tolerance'} needs a baseline: pass --baseline FILE "
            "or set baseline in the config"
        )
    tolerance = tolerance or 0.0
    old: dict[str, dict[str, Any]] | None = None
    if baseline is not None and (baseline.exists() or not update_baseline):
        old = load_baseline(baseline)
    targets = resolve_targets(paths, config, flags, cwd)
    results = []
    for target in targets:
        if not target.rules and baseline is None:
            raise LoraCompressError(
                f"{display_path(target.path, cwd)}: no threshold applies; pass --max-params/--max-bytes/--max-rank/"
                "--min-quality, a config entry whose path matches it, or --baseline"
            )
        m = measure(target.path, display_path(target.path, cwd))
        findings = threshold_findings(m, target.rules)
        if baseline is not None:
            entry = (old or {}).get(baseline_key(target.path, config.root))
            if entry is not None or old is not None:
                findings += growth_findings(m, entry, tolerance, f"baseline {baseline.name}", enforce=not update_baseline)
        results.append(AdapterResult(m.path, target.path, m, findings))
    result = CheckResult(results, baseline, tolerance if baseline is not None else None)
    if update_baseline and baseline is not None:
        entries = dict(old or {})
        entries.update({baseline_key(r.folder, config.root): r.measurement.sizes() for r in results})
        write_text_atomic(baseline, baseline_text(entries))
        result.baseline_updated = True
    return result


def report_sizes(paths: Sequence[str], config: CheckConfig, cwd: Path) -> tuple[list[Measurement], dict[str, dict[str, Any]]]:
    """Measurements for ``report``: one per target, and the baseline entries keyed relative to the root."""
    targets = resolve_targets(paths, config, Thresholds(), cwd)
    measurements = [measure(t.path, display_path(t.path, cwd)) for t in targets]
    entries = {baseline_key(t.path, config.root): m.sizes() for t, m in zip(targets, measurements)}
    return measurements, entries
