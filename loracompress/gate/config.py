"""The gate's config file (``[check]`` in loracompress.toml or ``[tool.loracompress.check]`` in pyproject.toml)
and the adapter folders it names (paths and globs)."""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracompress.core.adapter import CONFIG_NAME
from loracompress.errors import LoraCompressError
from loracompress.gate.thresholds import Thresholds, parse_tolerance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

CONFIG_FILE = "loracompress.toml"
PYPROJECT_FILE = "pyproject.toml"

_SECTION_KEYS = ("baseline", "tolerance", "adapters")
_GLOB_CHARS = re.compile(r"[*?\[]")


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
    elif path.is_dir():
        inside = [path / n for n in (CONFIG_FILE, PYPROJECT_FILE) if (path / n).is_file()]
        fix = f"pass --config {inside[0]}" if inside else "give the loracompress.toml or pyproject.toml file itself"
        raise LoraCompressError(f"--config {path} is a folder; {fix}")
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


def resolve_targets(paths: Sequence[str], config: CheckConfig, flags: Thresholds, cwd: Path,
                    verb: str = "check") -> list[Target]:
    """The folders to check: ``paths`` (folders or globs, relative to ``cwd``) or else every config entry.
    ``verb`` names the command in the message when there is neither ("nothing to report")."""
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
        raise LoraCompressError(f"nothing to {verb}: pass adapter folders{where}")
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
