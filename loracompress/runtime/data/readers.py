"""Reading a data file or folder into raw rows: one reader per format, no field logic.

:func:`read_records` picks the reader by extension (sniffing JSON Lines when there is none) and
returns the rows (dicts, or plain strings for text files) with the format's name.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}


def read_records(p: Path) -> tuple[list[Any], str]:
    """Rows as dicts (or plain strings for text files), and the format's name."""
    if p.is_dir():
        return _read_arrow_dir(p), "datasets"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p), "parquet"
    if suffix == ".arrow":
        return _read_arrow_files([p]), "arrow"
    text = _read_text(p)
    if suffix in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, p), "jsonl"
    if suffix == ".json":
        return _parse_json(text, p), "json"
    if suffix in (".csv", ".tsv"):
        return _parse_csv(text, p, "\t" if suffix == ".tsv" else ","), suffix[1:]
    if suffix not in TEXT_SUFFIXES and text.lstrip().startswith("{"):
        return _parse_jsonl(text, p), "jsonl"
    return _parse_text(text), "text"


# ----------------------------------------------------------------------------- text formats


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (Excel's "Unicode text")
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise LoraCompressError(f"data {p} starts like UTF-16 but does not decode; re-save it as UTF-8") from None
    if b"\x00" in raw[:8192]:
        raise LoraCompressError(
            f"data {p} is a binary file; pass JSONL, CSV/TSV, plain text, parquet or a datasets folder"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoraCompressError(
            f"data {p} is not UTF-8 (byte {err.start}); re-save it as UTF-8"
        ) from None


def _parse_jsonl(text: str, p: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
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
        return _parse_jsonl(text, p)  # JSON Lines saved as .json
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


def _parse_csv(text: str, p: Path, delimiter: str) -> list[Any]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as err:
        raise LoraCompressError(f"data {p}, line {reader.line_num}: bad CSV ({err}); fix the file") from None
    if reader.fieldnames is None:
        return []
    for r in rows:
        r.pop(None, None)  # extra cells without a header: csv puts them under None
    return rows


def _parse_text(text: str) -> list[str]:
    lines = text.strip().splitlines()  # blank lines only count between samples
    if any(not line.strip() for line in lines):
        # Blank lines separate paragraphs: one sample each, its lines joined.
        paragraphs, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.rstrip())
            elif cur:
                paragraphs.append("\n".join(cur))
                cur = []
        return paragraphs
    return [line.rstrip() for line in lines if line.strip()]


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
