"""Which fields of the rows hold the text, the second text and the label; rows to :class:`Examples`."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example, Examples
from loracompress.runtime.data.labels import LabelNames, class_indices

log = logging.getLogger(__name__)

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


#: rows without the text field (another schema: ``sentence`` where the rest say ``text``) above this share
#: are refused: dropping them would quietly evaluate or calibrate on part of the data
MAX_MISSING_SHARE = 0.05
#: with a subset to take, the first pass keeps the texts it reads up to this many characters, so a
#: file of ordinary size is read once; past it they are dropped and the chosen ones read again
HOLD_CHARS = 32 * 2**20

T = TypeVar("T")


class Held(Generic[T]):
    """The samples a first pass reads, in order. With a subset to take (``bounded``) they are kept only
    while they total at most :data:`HOLD_CHARS` characters; past it ``items`` is ``None`` and the chosen
    ones are read again (:func:`take`)."""

    def __init__(self, bounded: bool) -> None:
        self.items: list[T] | None = []
        self.bounded = bounded
        self._chars = 0

    def add(self, item: T, chars: int) -> None:
        if self.items is None:
            return
        self.items.append(item)
        self._chars += chars
        if self.bounded and self._chars > HOLD_CHARS:
            self.items = None  # too much to hold for a subset


def take(held: Held[T], again: Iterable[T], positions: Sequence[int] | None, n: int, p: Path) -> list[T]:
    """The samples at ``positions`` (all when ``None``) of the ``n`` a first pass counted: from what it
    held, or else read again from ``again`` (the same samples, in the same order)."""
    if held.items is not None:
        return held.items if positions is None else [held.items[j] for j in positions]
    wanted = iter(positions) if positions is not None else None
    target = next(wanted, None) if wanted is not None else None
    kept: list[T] = []
    count = 0
    for j, item in enumerate(again):
        count = j + 1
        if wanted is None or j == target:
            kept.append(item)
            if wanted is not None:
                target = next(wanted, None)
    if count != n:
        raise LoraCompressError(f"data {p} changed while it was read ({n} samples, then {count}); run again")
    return kept


def examples_from_records(
    records: Iterable[dict[str, Any]],
    p: Path,
    *,
    text_field: str | None,
    label_field: str | None,
    label_names: LabelNames | None = None,
    max_chars: int | None = None,
    choose: Callable[[int], Sequence[int] | None] | None = None,
) -> Examples:
    """Detect (or check) the fields of ``records`` and build one :class:`Example` per row with text.

    Texts are cut to ``max_chars`` characters (see :func:`~loracompress.runtime.data.batching.char_limit`).
    Rows that lack the text field are *missing*: skipped with a warning up to :data:`MAX_MISSING_SHARE`
    of the rows, refused above it. Rows whose text is empty are skipped with a warning.

    ``choose(n)``, given the number of samples, returns the sorted positions of those to keep (``None``:
    all). When the file's texts are over :data:`HOLD_CHARS`, ``records`` is read twice (it must be
    re-iterable, like :class:`~loracompress.runtime.data.readers.Records`): once to count the samples and
    check every row and label, once to keep the chosen texts, so a subset of a huge file costs the
    subset, not the file. ``info["total_samples"]`` is the number of samples before the subset.
    """
    rows = iter(records)
    head = list(islice(rows, 1000))
    close = getattr(rows, "close", None)
    if close is not None:
        close()  # the rest is read in the passes below
    if not head:
        raise LoraCompressError(f"data {p} holds no samples; pass a non-empty file")
    first, second, kind, lab = _fields(head, p, text_field, label_field)

    def missing(r: dict[str, Any]) -> bool:
        return first not in r and (second is None or second not in r)

    def texts_of(r: dict[str, Any], i: int) -> tuple[str, str | None] | None:
        t, s = _text(r.get(first), p, first, i), _text(r.get(second), p, second, i) if second else None
        if not t and not s:
            return None
        if max_chars is not None:
            t, s = t[:max_chars], s[:max_chars] if s is not None else None
        return t, s

    # Pass 1: every row checked and counted, the label of every sample kept (as codes of its distinct values).
    total = n_missing = empty = 0
    missing_keys: list[str] = []
    bad: LoraCompressError | None = None
    codes, values = array("q"), _Distinct()
    held: Held[tuple[str, str | None]] = Held(bounded=choose is not None)
    for i, r in enumerate(records):
        total += 1
        if missing(r):
            n_missing += 1
            if n_missing <= 1000:
                missing_keys.extend(k for k in r if k not in missing_keys)
            continue
        if bad is not None:
            continue
        try:
            texts = texts_of(r, i)
        except LoraCompressError as err:
            bad = err  # raised after the check of missing rows, which names the likelier cause
            continue
        if texts is None:
            empty += 1
            continue
        if lab:
            codes.append(values.code(r.get(lab)))
        held.add(texts, len(texts[0]) + len(texts[1] or ""))
    share = n_missing / total
    if share > MAX_MISSING_SHARE:
        have = ", ".join(repr(k) for k in missing_keys[:5]) or "no fields"
        raise LoraCompressError(
            f"data {p}: {n_missing} of {total} rows ({_pct(share)}) have no {first!r} field (they have {have}); "
            f"make every row use {first!r}, or pass --text-field for the field they share"
        )
    if n_missing:
        log.warning("data %s: skipped %d of %d row(s) (%s) with no %r field", p, n_missing, total, _pct(share), first)
    if bad is not None:
        raise bad
    if empty:
        log.warning("data %s: skipped %d sample(s) with an empty %r", p, empty, first)
    n = total - n_missing - empty
    labels, names = class_indices(values.expand(codes), p, lab, label_names) if lab else (None, None)
    del codes

    def samples() -> Iterator[tuple[str, str | None]]:  # the texts of pass 1's samples, read again
        for i, r in enumerate(records):
            texts = None if missing(r) else texts_of(r, i)
            if texts is not None:
                yield texts

    positions = choose(n) if choose is not None else None
    kept = take(held, samples(), positions, n, p)
    if positions is not None and labels is not None:
        labels = [labels[j] for j in positions]
    out = Examples(label_names=names, info={"text_field": first, "label_field": lab if labels else None,
                                            "total_samples": n})
    if kind == "completion":
        out.info["completion_field"] = second
    elif kind == "pair":
        out.info["pair_field"] = second
    for j, (t, s) in enumerate(kept):
        out.append(Example(
            text=t,
            label=labels[j] if labels is not None else None,
            completion=s if kind == "completion" else None,
            pair=s if kind == "pair" else None,
        ))
    return out


def _fields(head: list[dict[str, Any]], p: Path, text_field: str | None,
            label_field: str | None) -> tuple[str, str | None, str, str | None]:
    """``(text field, second text field, kind, label field)`` from the keys of the first rows."""
    fields: list[str] = []
    for r in head:  # union of the first rows' keys, in order of appearance
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
    lab: str | None
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
    return first, second, kind, lab


class _Distinct:
    """Label values stored once each: a huge file's labels cost one small integer per sample."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._index: dict[tuple[type, Any], int] = {}

    def code(self, value: Any) -> int:
        try:
            key = (type(value), value)  # the type too: 1, 1.0 and True are equal keys, but not equal labels
            found = self._index.get(key)
        except TypeError:  # unhashable (a list): kept as it is, for class_indices to refuse
            self.values.append(value)
            return len(self.values) - 1
        if found is None:
            found = self._index[key] = len(self.values)
            self.values.append(value)
        return found

    def expand(self, codes: Iterable[int]) -> list[Any]:
        return [self.values[c] for c in codes]


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


def _pct(share: float) -> str:
    """0.5 -> '50%', 0.025 -> '2.5%', 0.0667 -> '6.67%'."""
    return f"{100 * share:.3g}%"
