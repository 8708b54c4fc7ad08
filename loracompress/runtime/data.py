"""Calibration and evaluation data: read it from the user's files, split it, batch it.

Formats (chosen by extension, sniffed when there is none):

* JSON Lines (``.jsonl``; ``.json`` holding a list of records or one record per line),
* CSV / TSV with a header row (``.csv``, ``.tsv``),
* plain text (``.txt`` and anything else that is UTF-8 text): one sample per line, or one per
  paragraph when the file has blank lines,
* parquet (``.parquet``, read with pyarrow),
* a folder written by ``datasets.Dataset.save_to_disk`` (its ``.arrow`` files are read with
  pyarrow; the ``datasets`` package is not needed).

The text field is detected (``text``, ``sentence``, ``content``, …) or given. Prompt/completion
pairs (``prompt``+``completion``, ``prompt``+``response``, ``instruction``+``output``, …) are
detected for causal LMs: the loss is then taken on the completion tokens only. Sentence pairs
(``sentence1``+``sentence2``, ``premise``+``hypothesis``, …) are detected for classifiers. The
label field is detected among ``label``, ``labels``, ``target``, ``class``, ``y`` or given; string
labels become class indices in sorted order (or in the model's own ``label2id`` order).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) ignore
#: batch keys that are model inputs (``labels`` is not: callers compute their own losses)
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

TEXT_FIELDS = ("text", "sentence", "content", "review", "document", "prompt", "input", "question",
               "instruction", "query", "body", "passage", "source", "sentence1", "premise", "tweet",
               "comment", "message", "abstract", "article", "title")
# (first, second) field names: a prompt followed by what the LM should produce.
COMPLETION_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("prompt", "chosen"),
                    ("prompt", "output"), ("prompt", "answer"), ("instruction", "output"),
                    ("instruction", "response"), ("input", "output"), ("input", "target_text"),
                    ("question", "answer"), ("query", "response"), ("source", "target_text"))
# (first, second) field names: two texts a classifier reads together.
SENTENCE_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                  ("question1", "question2"), ("sentence_a", "sentence_b"), ("text_a", "text_b"),
                  ("question", "passage"))
LABEL_FIELDS = ("label", "labels", "target", "class", "y", "category", "sentiment")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}


@dataclass
class Example:
    """One sample.

    Attributes:
        text: the input text (the prompt when ``completion`` is set; the first text of a pair).
        label: class index for classification.
        completion: for prompt/completion pairs (causal LM): the loss is on these tokens only.
        pair: the second text of a sentence pair (classification), encoded as the tokenizer's pair.
    """

    text: str
    label: int | None = None
    completion: str | None = None
    pair: str | None = None


class Examples(list):  # type: ignore[type-arg]
    """A ``list[Example]`` that also records how it was read (fields, label names, source)."""

    def __init__(self, items: Iterable[Example] = (), *, label_names: list[str] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.label_names = label_names
        self.info: dict[str, Any] = dict(info or {})

    def derive(self, items: Iterable[Example]) -> Examples:
        """A new collection of ``items`` with this one's label names and info."""
        return Examples(items, label_names=self.label_names, info=self.info)


# ----------------------------------------------------------------------------- reading


def read_examples(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    label2id: dict[str, int] | None = None,
) -> Examples:
    """Read the samples in ``path`` (a file or a ``save_to_disk`` folder).

    Args:
        path: the data file or folder.
        text_field: the field holding the text; detected when ``None``.
        label_field: the field holding the class; detected when ``None``. Give ``""`` to ignore labels.
        max_samples: keep a seeded random subset of at most this many samples (in file order).
        seed: seed of that subset.
        label2id: how string labels map to indices (e.g. the model's ``config.label2id``);
            sorted order when ``None``.

    Raises:
        LoraCompressError: missing, empty, binary or non-UTF-8 data, no text field, bad labels.
    """
    p = Path(path).expanduser()
    if max_samples is not None and max_samples < 1:
        raise LoraCompressError(f"--max-samples must be >= 1 (got {max_samples})")
    if not p.exists():
        raise LoraCompressError(f"data {p} not found; pass --data with an existing file or folder")
    records, fmt = _read_records(p)
    if not records:
        raise LoraCompressError(f"data {p} holds no samples; pass a non-empty file")
    if fmt == "text":
        examples = Examples((Example(text=t) for t in records), info={"format": fmt, "text_field": None})
    else:
        examples = _from_records(records, p, text_field=text_field, label_field=label_field, label2id=label2id)
        examples.info["format"] = fmt
    if not examples:
        raise LoraCompressError(f"data {p}: every sample has an empty text; pass a file with text in it")
    examples.info["source"] = str(p)
    examples.info["total_samples"] = len(examples)
    if max_samples is not None and max_samples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
        examples = examples.derive(examples[i] for i in keep)
    examples.info["samples"] = len(examples)
    return examples


def _read_records(p: Path) -> tuple[list[Any], str]:
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


# ----------------------------------------------------------------------------- fields


def _pick(fields: Sequence[str], candidates: Sequence[str]) -> str | None:
    lower = {f.lower(): f for f in fields}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _pair(fields: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    lower = {f.lower(): f for f in fields}
    for a, b in pairs:
        if a in lower and b in lower:
            return lower[a], lower[b]
    return None


def _from_records(
    records: list[dict[str, Any]],
    p: Path,
    *,
    text_field: str | None,
    label_field: str | None,
    label2id: dict[str, int] | None,
) -> Examples:
    fields: list[str] = []
    for r in records[:1000]:  # union of the first rows' keys, in order of appearance
        fields.extend(k for k in r if k not in fields)
    seen = ", ".join(fields) or "none"
    second: str | None = None
    kind = "text"
    if text_field:
        if text_field not in fields:
            raise LoraCompressError(f"data {p} has no field {text_field!r} (fields: {seen}); fix --text-field")
        first = text_field
    else:
        comp = _pair(fields, COMPLETION_PAIRS)
        sent = _pair(fields, SENTENCE_PAIRS)
        if comp:
            (first, second), kind = comp, "completion"
        elif sent:
            (first, second), kind = sent, "pair"
        else:
            found = _pick(fields, TEXT_FIELDS)
            if found is None:
                raise LoraCompressError(f"data {p}: no text field found (fields: {seen}); pass --text-field NAME")
            first = found
    if label_field == "":
        lab = None
    elif label_field:
        if label_field not in fields:
            raise LoraCompressError(f"data {p} has no field {label_field!r} (fields: {seen}); fix --label-field")
        lab = label_field
    else:
        lab = _pick([f for f in fields if f not in (first, second)], LABEL_FIELDS)
        if lab is not None and kind == "completion":
            lab = None  # prompt/completion data is for LMs: a "target"-like column is not a class

    texts, skipped = [], 0
    for i, r in enumerate(records):
        t, s = _text(r.get(first), p, first, i), _text(r.get(second), p, second, i) if second else None
        if not t and not s:
            skipped += 1
            continue
        texts.append((i, t, s))
    if skipped:
        log.warning("data %s: skipped %d sample(s) with an empty %r", p, skipped, first)

    labels, names = _labels([records[i].get(lab) for i, _, _ in texts], p, lab, label2id) if lab else (None, None)
    out = Examples(label_names=names, info={"text_field": first, "label_field": lab if labels else None})
    if kind == "completion":
        out.info["completion_field"] = second
    elif kind == "pair":
        out.info["pair_field"] = second
    for j, (_, t, s) in enumerate(texts):
        out.append(Example(
            text=t,
            label=labels[j] if labels is not None else None,
            completion=s if kind == "completion" else None,
            pair=s if kind == "pair" else None,
        ))
    return out


def _text(value: Any, p: Path, name: str | None, row: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise LoraCompressError(
        f"data {p}, sample {row}: field {name!r} holds a {type(value).__name__}, not text; pass --text-field with a text field"
    )


def _labels(
    values: list[Any], p: Path, name: str, label2id: dict[str, int] | None
) -> tuple[list[int] | None, list[str] | None]:
    """Class indices for ``values`` and, for string labels, the names in index order."""
    present = [v for v in values if v is not None and v != ""]
    if not present:
        log.warning("data %s: field %r is empty everywhere; treating the data as unlabelled", p, name)
        return None, None
    if len(present) != len(values):
        raise LoraCompressError(
            f"data {p}: {len(values) - len(present)} of {len(values)} samples have no {name!r}; label every sample or pass --label-field ''"
        )
    kinds = {_label_kind(v) for v in present}
    if kinds == {"int"}:
        ints = [int(float(v)) if isinstance(v, str) else int(v) for v in present]
        if all(v == -1 for v in ints):  # the HF convention for an unlabelled (test) split
            log.warning("data %s: every %r is -1 (unlabelled split); ignoring labels", p, name)
            return None, None
        bad = next((v for v in ints if v < 0), None)
        if bad is not None:
            raise LoraCompressError(f"data {p}: label {bad} in {name!r} is negative; labels must be class indices >= 0")
        return ints, None
    if kinds == {"str"}:
        strs = [str(v).strip() for v in present]
        if label2id:
            missing = sorted(set(strs) - set(label2id))
            if missing:
                raise LoraCompressError(
                    f"data {p}: label {missing[0]!r} is not one of the model's labels ({', '.join(sorted(label2id))}); fix the data"
                )
            mapping = dict(label2id)
        else:
            mapping = {s: i for i, s in enumerate(sorted(set(strs)))}
        names = [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        log.info("data %s: string labels mapped to indices: %s", p, mapping)
        return [mapping[s] for s in strs], names
    example = next(v for v in present if _label_kind(v) not in ("int", "str") or len(kinds) > 1)
    raise LoraCompressError(
        f"data {p}: field {name!r} mixes label kinds or holds non-class values (e.g. {example!r}); "
        "use one integer or string class per sample, or pass --label-field"
    )


def _label_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "int"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "int" if v.is_integer() else "other"
    if isinstance(v, str):
        try:
            x = float(v)  # "1" or "1.0" from a CSV is a class index, "0.5" is not a class
        except ValueError:
            return "str"
        return "int" if x.is_integer() else "other"
    return "other"


# ----------------------------------------------------------------------------- splitting, checks


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (calibration, held-out) with a seeded shuffle; both keep the file order."""
    if not 0.0 < fraction < 1.0:
        raise LoraCompressError(f"--eval-fraction must be between 0 and 1 (got {fraction})")
    n = len(examples)
    k = max(1, round(n * fraction))
    if n < 2 or k >= n:
        raise LoraCompressError(
            f"{n} sample(s) are too few to hold out {fraction:.0%} for evaluation; pass more data or --eval-data"
        )
    held = set(random.Random(seed).sample(range(n), k))
    train = [e for i, e in enumerate(examples) if i not in held]
    test = [e for i, e in enumerate(examples) if i in held]
    if isinstance(examples, Examples):
        return examples.derive(train), examples.derive(test)
    return train, test


def check_labels(examples: list[Example], num_labels: int) -> None:
    """Every label must be a class of the model's head (``0 .. num_labels-1``)."""
    for i, e in enumerate(examples):
        if e.label is not None and not 0 <= e.label < num_labels:
            raise LoraCompressError(
                f"sample {i} has label {e.label} but the model's head has {num_labels} classes (0..{num_labels - 1}); "
                "fix the labels or pass the right --label-field"
            )


# ----------------------------------------------------------------------------- batching


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int] | None = None  # per-token LM labels
    type_ids: list[int] | None = None


def make_batches(
    examples: list[Example],
    tokenizer: Any,
    *,
    task: str,
    seq_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize and pad ``examples`` into batches (right padding, truncated to ``seq_len``).

    ``task == "cls"``: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    makes them), plus ``labels`` (LongTensor[B]) when every example has a label.
    ``task == "lm"``: ``input_ids``, ``attention_mask``, ``labels`` = ``input_ids`` with -100 on
    padding and, for prompt/completion pairs, on the prompt tokens.
    """
    if task not in ("cls", "lm"):
        raise ValueError(f"task must be 'cls' or 'lm', not {task!r}")
    if tokenizer is None:
        raise LoraCompressError("the base model has no tokenizer; pass a --base-model folder that includes one")
    if seq_len < 2 or batch_size < 1:
        raise LoraCompressError(f"--seq-len must be >= 2 and --batch-size >= 1 (got {seq_len}, {batch_size})")
    if not examples:
        raise LoraCompressError("no samples to batch; pass more data")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    pad_id = _pad_id(tokenizer)
    with_labels = task == "cls" and all(e.label is not None for e in examples)
    encoded = [_encode(examples[i], tokenizer, task, seq_len) for i in order]
    if task == "lm":
        empty = sum(1 for e in encoded if e.labels is not None and all(v == IGNORE_INDEX for v in e.labels[1:]))
        if empty:
            log.warning("%d sample(s) have no completion tokens left within --seq-len %d; raise --seq-len",
                        empty, seq_len)
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[r, :len(e.ids)] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if chunk[0].type_ids is not None:
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(chunk):
                types[r, :len(e.ids)] = torch.tensor(e.type_ids or [0] * len(e.ids), dtype=torch.long)
            batch["token_type_ids"] = types
        if task == "lm":
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for r, e in enumerate(chunk):
                labels[r, :len(e.ids)] = torch.tensor(e.labels, dtype=torch.long)
            batch["labels"] = labels
        elif with_labels:
            batch["labels"] = torch.tensor([examples[i].label for i in order[start:start + batch_size]],
                                           dtype=torch.long)
        batches.append(batch)
    return batches


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0  # masked out everywhere it is used


def _encode(e: Example, tokenizer: Any, task: str, seq_len: int) -> _Encoded:
    if task == "cls":
        enc = tokenizer(e.text, e.pair, truncation=True, max_length=seq_len)
        ids = list(enc["input_ids"])
        types = enc.get("token_type_ids")
        return _Encoded(ids=ids, type_ids=list(types) if types is not None else None)
    if e.completion is None:
        ids = list(tokenizer(e.text, truncation=True, max_length=seq_len)["input_ids"])
        return _Encoded(ids=ids, labels=list(ids))
    # The prompt's own tokenization gives where the completion starts; the joint one gives
    # the tokens (BPE may merge across the seam, so the boundary is the prompt's length).
    full = list(tokenizer(e.text + e.completion, truncation=True, max_length=seq_len)["input_ids"])
    n_prompt = len(tokenizer(e.text)["input_ids"])
    labels = [IGNORE_INDEX if k < n_prompt else t for k, t in enumerate(full)]
    return _Encoded(ids=full, labels=labels)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch (no ``labels``, so HF models do not compute a loss)."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_KEYS}


def prepare_model(base_model: Any) -> None:
    """Tell the model the tokenizer's pad id: HF classifiers with a decoder body (Llama, GPT-2, ...)
    find each sequence's last token by it, and refuse batches of more than one without it."""
    tok, config = getattr(base_model, "tokenizer", None), getattr(base_model.model, "config", None)
    pad = getattr(tok, "pad_token_id", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and isinstance(pad, int):
        config.pad_token_id = pad


def model_label2id(base_model: Any) -> dict[str, int] | None:
    """The model's own label names (``config.label2id``), unless they are the generic ``LABEL_i``."""
    mapping = getattr(getattr(base_model.model, "config", None), "label2id", None) or {}
    if not mapping or all(str(k).startswith("LABEL_") for k in mapping):
        return None
    return {str(k): int(v) for k, v in mapping.items()}


def read_for_model(
    base_model: Any,
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> Examples:
    """:func:`read_examples` for ``base_model``: string labels in the model's order, labels checked
    against its head."""
    examples = read_examples(path, text_field=text_field, label_field=label_field, max_samples=max_samples,
                             seed=seed, label2id=model_label2id(base_model))
    num_labels = int(getattr(getattr(base_model.model, "config", None), "num_labels", 0) or 0)
    if task_of(base_model) == "cls" and num_labels:
        check_labels(examples, num_labels)
    return examples


def task_of(base_model: Any) -> str:
    """``"cls"`` for sequence classification, ``"lm"`` for causal LMs (a :class:`~loracompress.runtime.model.BaseModel`)."""
    task = getattr(base_model, "task_type", None)
    if task == "SEQ_CLS":
        return "cls"
    if task == "CAUSAL_LM" or getattr(base_model, "is_causal_lm", False):
        return "lm"
    raise LoraCompressError(
        f"data-driven compression supports CAUSAL_LM and SEQ_CLS adapters, not task_type {task!r}; "
        "use the training-free cut (no --data)"
    )
