"""Reading a data file or folder into raw rows: one reader per format, no field logic.

:func:`read_records` picks the reader by extension (sniffing JSON Lines when there is none) and
returns the rows (dicts, or plain strings for text files) with the format's name.

Line-based files (plain text, JSON Lines, CSV/TSV) are read as a stream, never as one string:
a plain-text line longer than ``max_chars`` is cut while it is read, so a 100 MB one-line file
costs ``max_chars`` characters, not its size. (A JSON record must be parsed whole; its texts are
cut right after, before anything is tokenised.)
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from loracompress.errors import LoraCompressError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}
_SKIP_CHUNK = 1 << 20  # characters read at a time while skipping the rest of an over-long line


def read_records(p: Path, max_chars: int | None = None) -> tuple[list[Any], str]:
    """Rows as dicts (or plain strings for text files, each at most ``max_chars`` long), and the format's name."""
    if p.is_dir():
        return _read_arrow_dir(p), "datasets"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p), "parquet"
    if suffix == ".arrow":
        return _read_arrow_files([p]), "arrow"
    encoding = _sniff_encoding(p)
    if suffix in (".csv", ".tsv"):
        with open(p, encoding=encoding, newline="") as f:  # csv reads the line endings itself
            return _parse_csv(f, p, "\t" if suffix == ".tsv" else ",", encoding), suffix[1:]
    with open(p, encoding=encoding) as f:  # universal newlines: every line ends in "\n"
        if suffix == ".json":
            return _parse_json(_read_all(f, p, encoding), p), "json"
        if suffix in (".jsonl", ".ndjson") or (suffix not in TEXT_SUFFIXES and _first_char(f, p, encoding) == "{"):
            return _parse_jsonl(_decoded(_lines(f), p, encoding), p), "jsonl"
        return _parse_text(_decoded(_lines(f, max_chars), p, encoding), max_chars), "text"


# ----------------------------------------------------------------------------- text formats


def _sniff_encoding(p: Path) -> str:
    """UTF-16 when the file starts with its byte-order mark, else UTF-8 (a UTF-8 BOM is dropped); binary refused."""
    with open(p, "rb") as f:
        head = f.read(8192)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (Excel's "Unicode text")
        return "utf-16"
    if b"\x00" in head:
        raise LoraCompressError(
            f"data {p} is a binary file; pass JSONL, CSV/TSV, plain text, parquet or a datasets folder"
        )
    return "utf-8-sig"


def _decoded(lines: Iterator[str], p: Path, encoding: str) -> Iterator[str]:
    """``lines``, with a decoding error turned into the one-line fix (the line it happened on)."""
    n = 0
    try:
        for n, line in enumerate(lines, 1):  # noqa: B007 - n names the line a decoding error is on
            yield line
    except UnicodeDecodeError:
        raise _not_decodable(p, encoding, f" (line {n + 1})") from None


def _read_all(f: IO[str], p: Path, encoding: str) -> str:
    try:
        return f.read()
    except UnicodeDecodeError:
        raise _not_decodable(p, encoding) from None


def _not_decodable(p: Path, encoding: str, where: str = "") -> LoraCompressError:
    if encoding == "utf-16":
        return LoraCompressError(f"data {p} starts like UTF-16 but does not decode; re-save it as UTF-8")
    return LoraCompressError(f"data {p} is not UTF-8{where}; re-save it as UTF-8")


def _lines(f: IO[str], max_chars: int | None = None) -> Iterator[str]:
    """The lines of ``f`` without their endings; with ``max_chars``, each cut to that length as it is read."""
    while True:
        line = f.readline(max_chars) if max_chars else f.readline()
        if not line:
            return
        if max_chars and len(line) >= max_chars and not line.endswith("\n"):
            rest = line
            while rest and not rest.endswith("\n"):  # drop the rest of this line, never holding it whole
                rest = f.readline(_SKIP_CHUNK)
        yield line.rstrip("\n")


def _first_char(f: IO[str], p: Path, encoding: str) -> str:
    """The first non-whitespace character of ``f`` (``""`` when there is none); ``f`` is rewound."""
    first = ""
    try:
        for chunk in iter(lambda: f.read(8192), ""):
            if chunk.strip():
                first = chunk.lstrip()[0]
                break
    except UnicodeDecodeError:
        raise _not_decodable(p, encoding) from None
    f.seek(0)
    return first


def _parse_jsonl(lines: Iterator[str], p: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LoraCompressError(f"data {p}, line {n}: not valid JSON ({err.msg}); fix that line") from None
        rows.append(_as_record(row, p, f"line {n}"))
    return rows


def _parse_json(text: str, p: Path) -> list[Any]:
    try:
        doc = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        return _parse_jsonl(iter(text.splitlines()), p)  # JSON Lines saved as .json
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == len(doc) > 1 and len({len(v) for v in lists}) == 1:
            doc = [dict(zip(doc, row)) for row in zip(*lists)]  # columns: {"text": [...], "label": [...]}
        elif len(lists) == 1:
            doc = lists[0]  # {"data": [...]}
        else:
            return [_as_record(doc, p, "the document")]
    if not isinstance(doc, list):
        raise LoraCompressError(f"data {p} is JSON but not a list of records; pass a list or JSON Lines")
    return [_as_record(row, p, f"record {i}") for i, row in enumerate(doc)]


def _as_record(row: Any, p: Path, where: str) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    if isinstance(row, str):
        return {"text": row}
    raise LoraCompressError(
        f"data {p}, {where}: expected an object like {{\"text\": ...}}, got {type(row).__name__}; fix the data"
    )


def _parse_csv(f: IO[str], p: Path, delimiter: str, encoding: str) -> list[Any]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(_decoded(f, p, encoding), delimiter=delimiter)
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as err:
        raise LoraCompressError(f"data {p}, line {reader.line_num}: bad CSV ({err}); fix the file") from None
    if reader.fieldnames is None:
        return []
    for r in rows:
        r.pop(None, None)  # extra cells without a header: csv puts them under None
    return rows


def _parse_text(lines: Iterator[str], max_chars: int | None = None) -> list[str]:
    """One sample per line; one per paragraph (its lines joined) when blank lines separate paragraphs.

    Blank lines before the first and after the last text do not count. Each line is already cut to
    ``max_chars`` as it is read; a joined paragraph is cut to it too.
    """
    paragraphs: list[list[str]] = []
    cur: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        if not line.strip():
            if cur:
                paragraphs.append(cur)
                cur = []
            continue
        if not paragraphs and not cur:
            line = line.lstrip()  # the file's leading whitespace is not part of the first sample
        cur.append(line)
    if cur:
        paragraphs.append(cur)
    if len(paragraphs) > 1:
        return ["\n".join(par)[:max_chars] for par in paragraphs]
    return paragraphs[0] if paragraphs else []


# ----------------------------------------------------------------------------- columnar formats (pyarrow)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LoraCompressError("reading parquet/arrow data needs pyarrow; pip install pyarrow") from None
    return pyarrow


def _read_parquet(p: Path) -> list[Any]:
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(p).to_pylist()
    except (pa.ArrowInvalid, OSError) as err:
        raise LoraCompressError(f"data {p} is not a readable parquet file ({str(err)[:120]}); check the file") from None


def _read_arrow_dir(p: Path) -> list[Any]:
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if d.is_dir())
        raise LoraCompressError(
            f"data {p} holds several splits ({', '.join(splits)}); pass one split folder, e.g. {p / (splits[0] if splits else 'train')}"
        )
    files = sorted(p.glob("*.arrow"))
    if not files:
        parquet = sorted(p.glob("*.parquet"))
        if parquet:
            return [row for f in parquet for row in _read_parquet(f)]
        raise LoraCompressError(
            f"folder {p} is not a datasets save_to_disk folder (no .arrow files); pass a data file or such a folder"
        )
    state = p / "state.json"
    if state.is_file():  # the shard order datasets itself uses
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            files = [p / n for n in names]
        except (KeyError, TypeError, ValueError):
            pass
    return _read_arrow_files(files)


def _read_arrow_files(files: Sequence[Path]) -> list[Any]:
    pa = _pyarrow()
    rows: list[Any] = []
    for f in files:
        table = None
        # datasets writes the IPC stream format; plain Arrow files use the file format.
        for opener in (pa.ipc.open_stream, pa.ipc.open_file):
            try:
                with pa.memory_map(str(f)) as src:
                    table = opener(src).read_all()
                break
            except (pa.ArrowInvalid, OSError):
                continue
        if table is None:
            raise LoraCompressError(f"data {f} is not a readable Arrow file; re-save the dataset with save_to_disk")
        rows.extend(table.to_pylist())
    return rows
