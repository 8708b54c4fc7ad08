"""Export formats: each one is a module that registers an :class:`ExportFormat` (its name, its options
dataclass and the function that writes it), and :func:`export` picks the format by the options' type, as
torchao's ``quantize_`` picks a handler by its config's type. A new format is one new module; the CLI's
``--format`` help and its printing come from here (a report knows its own summary lines).

Every format writes :data:`REPORT_NAME` beside its files (the record ``--force`` recognises) and returns
the same record as an :class:`ExportReport`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracompress.core.validate import reject_nonfinite
from loracompress.errors import LoraCompressError

#: the record every export writes beside its files
REPORT_NAME = "export_report.json"

#: the formats that ship with loracompress, imported (and so registered) on first use
_BUILTIN = ("onnx", "targets", "gguf", "genai_bank")


@dataclass(kw_only=True)
class ExportOptions:
    """What every format is told; a format's options extend this."""

    force: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:  # every format's options: a nan or inf value is refused
        reject_nonfinite(self)


class ExportReport(dict[str, Any]):
    """An export's record (the JSON written as :data:`REPORT_NAME`) and its summary for people.

    A format subclasses it to say what it wrote; :meth:`lines` is what ``loracompress export`` prints.
    """

    def lines(self) -> list[str]:
        return [f"wrote {self.get('output', '?')} (and {REPORT_NAME})"]

    def skipped(self) -> list[dict[str, str]]:
        """The LoRA modules and keys of the source that PEFT does not load, left out of the export."""
        return list(self.get("skipped") or [])


@dataclass(frozen=True)
class ExportFormat:
    """A registered format: ``export --format NAME`` builds ``options`` from the flags it declares (fields
    of the dataclass) and calls ``run(sources, output, options)``."""

    name: str
    help: str  # one line for ``export --help``
    options: type[ExportOptions]
    run: Callable[[Sequence[Path], Path, Any], ExportReport]
    many: bool = False  # takes several adapter folders


_FORMATS: dict[str, ExportFormat] = {}
_LOADED = False


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Make ``fmt`` available as ``export --format fmt.name`` and to :func:`export` by its options type."""
    formats()  # the built-in formats first, so that they keep their place in the help and their names
    if fmt.name in _FORMATS and _FORMATS[fmt.name].options is not fmt.options:
        raise ValueError(f"export format {fmt.name!r} is already registered with other options")
    clash = [f.name for f in _FORMATS.values() if f.options is fmt.options and f.name != fmt.name]
    if clash:
        raise ValueError(f"{fmt.options.__name__} already selects format {clash[0]!r}: give {fmt.name!r} its own options class")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, ExportFormat]:
    """Every registered format by name, the built-in ones first."""
    global _LOADED
    if not _LOADED:
        _LOADED = True  # before the imports: each of them registers through here
        for name in _BUILTIN:  # imported by name: they import this module, so it must not import them
            importlib.import_module(f"{__package__}.{name}")
    return dict(_FORMATS)


def format_named(name: str) -> ExportFormat:
    known = formats()
    fmt = known.get(name.lower())
    if fmt is None:
        raise LoraCompressError(f"unknown format {name!r}: use one of {', '.join(known)}")
    return fmt


def format_of(options: ExportOptions) -> ExportFormat:
    """The format that ``options``' type selects (its exact class, else the nearest registered base)."""
    by_type = {f.options: f for f in formats().values()}
    for cls in type(options).__mro__:
        if cls in by_type:
            return by_type[cls]
    raise LoraCompressError(f"{type(options).__name__} selects no export format; pass one of the formats' options")


def options_for(fmt: ExportFormat, given: dict[str, Any]) -> ExportOptions:
    """``fmt``'s options from command-line values: the fields it declares, where a value was given (not None)."""
    names = {f.name for f in dataclasses.fields(fmt.options)}
    return fmt.options(**{k: v for k, v in given.items() if k in names and v is not None})


def export(sources: Sequence[str | Path], output: str | Path, options: ExportOptions) -> ExportReport:
    """Export the adapter(s) at ``sources`` to ``output`` in the format ``options`` selects; returns its report."""
    fmt = format_of(options)
    paths = [Path(s) for s in sources]
    if not paths:
        raise LoraCompressError("pass at least one adapter folder")
    if len(paths) > 1 and not fmt.many:
        raise LoraCompressError(f"--format {fmt.name} takes one adapter folder")
    return fmt.run(paths, Path(output), options)
