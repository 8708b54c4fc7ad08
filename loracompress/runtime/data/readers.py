"""Reading a data file or folder into raw rows: one reader per format, no field logic.

:func:`read_records` picks the reader by extension (sniffing JSON Lines when there is none) and
returns the rows (dicts, or plain strings for text files) with the format's name.

The rows are :class:`Records`: a stream that reads the file afresh each time it is iterated, so a
caller that takes a subset (``--max-samples``) can count in one pass and keep only its subset in the
next, never holding every row. Line-based files (plain text, JSON Lines, CSV/TSV) are read line by
line, never as one string: a plain-text line longer than ``max_chars`` is cut while it is read, so a
100 MB one-line file costs ``max_chars`` characters, not its size. Parquet and Arrow files are read a
record batch at a time. (A JSON record must be parsed whole, and so must a ``.json`` document: its
rows are held once and served from memory.)
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from loracompress.errors import LoraCompressError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}
_SKIP_CHUNK = 1 << 20  # characters read at a time while skipping the rest of an over-long line
_BATCH_ROWS = 1024  # rows of a parquet/Arrow record batch turned into Python objects at a time


class Records:
    """The rows of a data file, read afresh on every iteration (so never all held at once)."""

    def __init__(self, rows: Callable[[], Iterator[Any]]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[Any]:
        return self._rows()


def read_records(p: Path, max_chars: int | None = None) -> tuple[Records, str]:
    """Rows as dicts (or plain strings for text files, each at most ``max_chars`` long), and the format's name.

    Errors in the file (bad JSON, bad CSV, undecodable text) are raised while the rows are iterated.
    """
    if p.is_dir():
        files, parquet = _arrow_dir_files(p)
        if parquet:
            return Records(lambda: (row for f in files for row in _parquet_rows(f))), "datasets"
        return Records(lambda: _arrow_rows(files)), "datasets"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return Records(lambda: _parquet_rows(p)), "parquet"
    if suffix == ".arrow":
        return Records(lambda: _arrow_rows([p])), "arrow"
    encoding = _sniff_encoding(p)
    if suffix in (".csv", ".tsv"):
        return Records(lambda: _csv_rows(p, "\t" if suffix == ".tsv" else ",", encoding)), suffix[1:]
    if suffix == ".json":
        with open(p, encoding=encoding) as f:  # one document: parsed whole, once
            rows = _parse_json(_read_all(f, p, encoding), p)
        return Records(lambda: iter(rows)), "json"
    with open(p, encoding=encoding) as f:
        jsonl = suffix in (".jsonl", ".ndjson") or (suffix not in TEXT_SUFFIXES and _first_char(f, p, encoding) == "{")
    if jsonl:
        return Records(lambda: _jsonl_rows(p, encoding)), "jsonl"
    # whether blank lines separate paragraphs decides what a sample is: one scan, which stops at the
    # second paragraph's first line (or reads a one-paragraph file through, holding nothing)
    with open(p, encoding=encoding) as f:
        paragraphs = _several_paragraphs(_decoded(_lines(f, max_chars), p, encoding))
    return Records(lambda: _text_rows(p, encoding, max_chars, paragraphs)), "text"


def _jsonl_rows(p: Path, encoding: str) -> Iterator[Any]:
    with open(p, encoding=encoding) as f:  # universal newlines: every line ends in "\n"
        yield from _parse_jsonl(_decoded(_lines(f), p, encoding), p)


def _csv_rows(p: Path, delimiter: str, encoding: str) -> Iterator[Any]:
    with open(p, encoding=encoding, newline="") as f:  # csv reads the line endings itself
        yield from _parse_csv(f, p, delimiter, encoding)


def _text_rows(p: Path, encoding: str, max_chars: int | None, paragraphs: bool) -> Iterator[str]:
    with open(p, encoding=encoding) as f:
        yield from _parse_text(_decoded(_lines(f, max_chars), p, encoding), max_chars, paragraphs)


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


def _parse_jsonl(lines: Iterator[str], p: Path) -> Iterator[Any]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LoraCompressError(f"data {p}, line {n}: not valid JSON ({err.msg}); fix that line") from None
        yield _as_record(row, p, f"line {n}")


def _parse_json(text: str, p: Path) -> list[Any]:
    try:
        doc = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        return list(_parse_jsonl(iter(text.splitlines()), p))  # JSON Lines saved as .json
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


def _parse_csv(f: IO[str], p: Path, delimiter: str, encoding: str) -> Iterator[Any]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(_decoded(f, p, encoding), delimiter=delimiter)
    while True:
        try:
            row = next(reader, None)
        except csv.Error as err:
            raise LoraCompressError(f"data {p}, line {reader.line_num}: bad CSV ({err}); fix the file") from None
        if row is None:
            return
        row = dict(row)
        row.pop(None, None)  # extra cells without a header: csv puts them under None
        yield row


def _several_paragraphs(lines: Iterator[str]) -> bool:
    """Do blank lines separate two texts (a second paragraph start after a blank line)?"""
    text = gap = False
    for raw in lines:
        if not raw.strip():
            gap = text
        elif gap:
            return True
        else:
            text = True
    return False


def _parse_text(lines: Iterator[str], max_chars: int | None = None, paragraphs: bool = False) -> Iterator[str]:
    """One sample per line; with ``paragraphs`` (blank lines separate them), one per paragraph, its lines joined.

    Blank lines before the first and after the last text do not count. Each line is already cut to
    ``max_chars`` as it is read; a joined paragraph is cut to it too (and stops growing there).
    """
    cur: list[str] = []
    size = 0  # of the joined paragraph so far
    first = True
    for raw in lines:
        line = raw.rstrip()
        if not line.strip():
            if cur and paragraphs:
                yield "\n".join(cur)[:max_chars]
                cur, size = [], 0
            continue
        if first:
            line, first = line.lstrip(), False  # the file's leading whitespace is not part of the first sample
        if not paragraphs:
            yield line
        elif not cur or max_chars is None or size < max_chars:  # past max_chars, more lines change nothing
            size += len(line) + (1 if cur else 0)
            cur.append(line)
    if cur:
        yield "\n".join(cur)[:max_chars]


# ----------------------------------------------------------------------------- columnar formats (pyarrow)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LoraCompressError("reading parquet/arrow data needs pyarrow; pip install pyarrow") from None
    return pyarrow


def _parquet_rows(p: Path) -> Iterator[Any]:
    pa = _pyarrow()
    try:
        batches = pa.parquet.ParquetFile(p).iter_batches(batch_size=_BATCH_ROWS)
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowInvalid, OSError) as err:
        raise LoraCompressError(f"data {p} is not a readable parquet file ({str(err)[:120]}); check the file") from None


def _arrow_dir_files(p: Path) -> tuple[list[Path], bool]:
    """The data files of a ``save_to_disk`` folder in their order, and whether they are parquet."""
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if d.is_dir())
        raise LoraCompressError(
            f"data {p} holds several splits ({', '.join(splits)}); pass one split folder, e.g. {p / (splits[0] if splits else 'train')}"
        )
    files = sorted(p.glob("*.arrow"))
    if not files:
        parquet = sorted(p.glob("*.parquet"))
        if parquet:
            return parquet, True
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
    return files, False


def _arrow_rows(files: Sequence[Path]) -> Iterator[Any]:
    pa = _pyarrow()
    for f in files:
        # datasets writes the IPC stream format; plain Arrow files use the file format. The file is
        # memory-mapped: only the batch being turned into rows is in memory.
        with pa.memory_map(str(f)) as src:
            batches = None
            for opener in (pa.ipc.open_stream, pa.ipc.open_file):
                try:
                    reader = opener(src)
                    batches = reader if opener is pa.ipc.open_stream else (
                        reader.get_batch(i) for i in range(reader.num_record_batches))
                    break
                except (pa.ArrowInvalid, OSError):
                    src.seek(0)
                    continue
            if batches is None:
                raise LoraCompressError(f"data {f} is not a readable Arrow file; re-save the dataset with save_to_disk")
            try:
                for batch in batches:
                    for start in range(0, batch.num_rows, _BATCH_ROWS):
                        yield from batch.slice(start, _BATCH_ROWS).to_pylist()
            except (pa.ArrowInvalid, OSError):
                raise LoraCompressError(f"data {f} is not a readable Arrow file; re-save the dataset with save_to_disk") from None
